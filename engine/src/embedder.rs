//! The public face of the engine: load a checkpoint, embed many texts at once.
//!
//! Inputs are sorted by length and cut into batches whose padded size stays within a token
//! budget, so short texts are not padded to the longest one; results come back in input order,
//! and because padding never changes a result they do not depend on how batches were formed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::encoding::{EncodedInput, InputEncoder, DEFAULT_MAX_LENGTH};
use crate::error::{Error, Result};
use crate::matmul::{self, MatmulBackend, Projections};
use crate::nvembed_v2::{Model, Pass, TOKEN_CHUNK_ROWS};
use crate::source::ModelFiles;
use crate::weights::Weights;

pub use nvembed_protocol::{DEFAULT_BATCH_TOKENS, DEFAULT_DTYPE};

#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Truncation limit in tokens, `<s>` included.
    pub max_length: usize,
    /// Upper bound on rows × padded length of one forward pass (a longer single input still runs).
    pub batch_tokens: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            max_length: DEFAULT_MAX_LENGTH,
            batch_tokens: DEFAULT_BATCH_TOKENS,
        }
    }
}

/// The precision a model is loaded in: one float dtype for weights and activations, or int8
/// weights (weight-only, quantized at load; the activations in bf16 where oneDNN has native bf16
/// kernels on this CPU, f32 elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelDtype {
    Float(DType),
    Int8,
}

impl From<DType> for ModelDtype {
    fn from(dtype: DType) -> Self {
        Self::Float(dtype)
    }
}

impl ModelDtype {
    /// The name `choose_dtype` reads for it (`int8` for int8 weights, whatever the activations).
    pub fn name(self) -> &'static str {
        match self {
            Self::Float(dtype) => dtype_name(dtype),
            Self::Int8 => nvembed_protocol::DTYPE_NAMES[4],
        }
    }
}

/// Parses an explicit float dtype: `f32`, `f16` or `bf16` (or PyTorch's `float32`, `float16`,
/// `bfloat16`).
pub fn parse_dtype(name: &str) -> Result<DType> {
    let [_, f32_name, f16_name, bf16_name, _] = nvembed_protocol::DTYPE_NAMES;
    match name.to_ascii_lowercase().as_str() {
        n if n == f32_name || n == "float32" => Ok(DType::F32),
        n if n == f16_name || n == "float16" => Ok(DType::F16),
        n if n == bf16_name || n == "bfloat16" => Ok(DType::BF16),
        other => Err(Error::InvalidArgument(format!(
            "unsupported dtype {other:?} (expected one of {})",
            nvembed_protocol::DTYPE_NAMES.join(", ")
        ))),
    }
}

/// The precision to load `files` in: `auto` is the checkpoint's own (its config's
/// `torch_dtype`, else the first weight's stored dtype), `int8` int8 weights, anything else as
/// `parse_dtype` reads it.
pub fn choose_dtype(name: &str, files: &ModelFiles) -> Result<ModelDtype> {
    if name.eq_ignore_ascii_case(nvembed_protocol::DEFAULT_DTYPE) {
        crate::weights::stored_dtype(files).map(ModelDtype::Float)
    } else if name.eq_ignore_ascii_case(ModelDtype::Int8.name()) {
        Ok(ModelDtype::Int8)
    } else {
        parse_dtype(name).map(ModelDtype::Float)
    }
}

/// The name `parse_dtype` reads for `dtype`.
pub fn dtype_name(dtype: DType) -> &'static str {
    let [_, f32_name, f16_name, bf16_name, _] = nvembed_protocol::DTYPE_NAMES;
    match dtype {
        DType::F16 => f16_name,
        DType::BF16 => bf16_name,
        _ => f32_name,
    }
}

/// What one `embed` call did, for progress and statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbedStats {
    pub tokens: usize,
    pub batches: usize,
}

pub struct Embedder {
    model: Model,
    encoder: InputEncoder,
    config: Config,
    device: Device,
    dtype: DType,
    precision: ModelDtype,
    load_seconds: f64,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dtype", &self.precision)
            .field("device", &self.device)
            .field("embedding_dim", &self.embedding_dim())
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads with the matmul backend `MatmulBackend::for_device` picks.
    pub fn load(files: &ModelFiles, dtype: impl Into<ModelDtype>, device: &Device) -> Result<Self> {
        Self::load_with(files, dtype, device, MatmulBackend::for_device(device)?)
    }

    pub fn load_with(
        files: &ModelFiles,
        dtype: impl Into<ModelDtype>,
        device: &Device,
        matmul: MatmulBackend,
    ) -> Result<Self> {
        keep_activations_on_the_heap();
        let started = Instant::now();
        let precision = dtype.into();
        let (dtype, int8) = match precision {
            ModelDtype::Float(dtype) => (dtype, false),
            ModelDtype::Int8 => (crate::matmul::int8_activation_dtype(matmul)?, true),
        };
        let config = Config::from_file(&files.config)?;
        let encoder = InputEncoder::from_file(&files.tokenizer)?;
        let projections = Projections {
            backend: matmul,
            int8: int8.then_some(dtype),
        };
        let weights = Weights::open(&files.weights, dtype, projections.weight_dtype(dtype), device)?;
        let model = Model::load(&weights, &config, projections)?;
        Ok(Self {
            model,
            encoder,
            config,
            device: device.clone(),
            dtype,
            precision,
            load_seconds: started.elapsed().as_secs_f64(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn encoder(&self) -> &InputEncoder {
        &self.encoder
    }

    /// The activations' dtype (the weights' too, unless they are int8).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The precision it was loaded in, as servers announce it: `choose_dtype`'s name (`bf16`,
    /// ...), for int8 with the activations' dtype (`int8-bf16`, `int8-f32`; see
    /// `nvembed_protocol::serves_dtype`).
    pub fn dtype_name(&self) -> String {
        match self.precision {
            ModelDtype::Float(dtype) => dtype_name(dtype).to_string(),
            ModelDtype::Int8 => format!("{}-{}", ModelDtype::Int8.name(), dtype_name(self.dtype)),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How the projections run: `candle`, oneDNN's implementation (e.g.
    /// `brg_matmul:avx512_core_bf16`, with `, int8 weights decompressed to BF16` for int8), or
    /// weights widened to f32; several, `; `-separated, if not all run the same way.
    pub fn matmul(&self) -> String {
        self.model.matmul()
    }

    pub fn embedding_dim(&self) -> usize {
        self.config.embedding_dim()
    }

    pub fn load_seconds(&self) -> f64 {
        self.load_seconds
    }

    /// Embeds `texts` with `instruction`; one unit vector per text,
    /// in input order. Fails before any compute if some input would have nothing to pool.
    pub fn embed(&self, instruction: &str, texts: &[&str], options: &EmbedOptions) -> Result<Vec<Vec<f32>>> {
        self.embed_with_stats(instruction, texts, options)
            .map(|(vectors, _)| vectors)
    }

    /// As `embed`, also saying how many tokens and forward passes it took.
    pub fn embed_with_stats(
        &self,
        instruction: &str,
        texts: &[&str],
        options: &EmbedOptions,
    ) -> Result<(Vec<Vec<f32>>, EmbedStats)> {
        let inputs = self.encode(instruction, texts, options.max_length)?;
        self.embed_encoded(&inputs, options.batch_tokens)
    }

    /// Tokenizes `texts` with `instruction`, failing if any would have nothing to pool or if
    /// `max_length` exceeds the model's position limit.
    pub fn encode(&self, instruction: &str, texts: &[&str], max_length: usize) -> Result<Vec<EncodedInput>> {
        self.check_max_length(max_length)?;
        let inputs = self.encoder.encode(instruction, texts, max_length)?;
        self.check_poolable(&inputs)?;
        Ok(inputs)
    }

    /// An encoder of one call's texts, one at a time (a server counts them as they arrive):
    /// checks `max_length` and measures the instruction once. When the instruction alone leaves
    /// nothing to pool, it fails here, before any text is tokenized.
    pub fn text_encoder<'e>(&'e self, instruction: &'e str, max_length: usize) -> Result<TextEncoder<'e>> {
        self.check_max_length(max_length)?;
        if max_length == 0 {
            return Err(Error::InvalidArgument("max_length must be at least 1".into()));
        }
        let prefix = self.encoder.instruction_len(instruction)?;
        if self.config.is_mask_instruction && prefix >= max_length {
            return Err(Error::NothingToPool {
                index: 0,
                tokens: max_length,
            });
        }
        Ok(TextEncoder {
            embedder: self,
            instruction,
            prefix,
            max_length,
        })
    }

    /// Embeds already-encoded inputs — possibly from several callers with different
    /// instructions — in length-sorted batches of at most `batch_tokens` padded tokens.
    pub fn embed_encoded(&self, inputs: &[EncodedInput], batch_tokens: usize) -> Result<(Vec<Vec<f32>>, EmbedStats)> {
        let mut results: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
        let mut stats = EmbedStats::default();
        for batch in plan_batches(inputs, batch_tokens) {
            let members: Vec<&EncodedInput> = batch.iter().map(|&i| &inputs[i]).collect();
            let vectors = self.forward(&members)?;
            for (&index, vector) in batch.iter().zip(vectors) {
                ensure_finite(index, &vector)?;
                results[index] = vector;
            }
            stats.tokens += members.iter().map(|m| m.ids.len()).sum::<usize>();
            stats.batches += 1;
        }
        Ok((results, stats))
    }

    /// The decoder's output (after its final RMSNorm) for `texts` as one padded batch,
    /// (rows × padded length × hidden), for checking against reference implementations.
    pub fn decoder_hidden_states(
        &self,
        instruction: &str,
        texts: &[&str],
        max_length: usize,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let inputs = self.encoder.encode(instruction, texts, max_length)?;
        let batch = self.encoder.pad(&inputs.iter().collect::<Vec<_>>());
        let ids = Tensor::new(batch.input_ids, &self.device)?;
        let attention = Tensor::new(batch.attention_mask, &self.device)?;
        let hidden = self.model.decoder_hidden_states(&ids, &attention)?;
        Ok(hidden.to_dtype(DType::F32)?.to_vec3::<f32>()?)
    }

    fn check_max_length(&self, max_length: usize) -> Result<()> {
        let limit = self.config.text_config.max_position_embeddings;
        if max_length > limit {
            return Err(Error::InvalidArgument(format!(
                "max_length {max_length} exceeds the model's position limit ({limit} tokens)"
            )));
        }
        Ok(())
    }

    fn check_poolable(&self, inputs: &[EncodedInput]) -> Result<()> {
        inputs
            .iter()
            .enumerate()
            .try_for_each(|(index, input)| self.check_poolable_one(index, input))
    }

    /// Input `index` has a token to pool (when the model masks the instruction).
    fn check_poolable_one(&self, index: usize, input: &EncodedInput) -> Result<()> {
        if self.config.is_mask_instruction && input.pooled_tokens() == 0 {
            return Err(Error::NothingToPool {
                index,
                tokens: input.ids.len(),
            });
        }
        Ok(())
    }

    /// Starts a forward pass over `members` as one padded batch.
    pub fn begin_pass(&self, members: &[&EncodedInput]) -> Result<EmbedPass> {
        let mut batch = self.encoder.pad(members);
        if !self.config.is_mask_instruction {
            batch.pool_mask = batch.attention_mask.clone();
        }
        let ids = Tensor::new(batch.input_ids, &self.device)?;
        let attention = Tensor::new(batch.attention_mask, &self.device)?;
        let pool = Tensor::new(batch.pool_mask, &self.device)?;
        let pass = self.model.begin(&ids, &attention, &pool)?;
        Ok(EmbedPass {
            _release: ReleaseOnDrop(pass.padded_tokens() >= TOKEN_CHUNK_ROWS),
            pass,
        })
    }

    /// Runs the next step of `pass` (a decoder layer, or a share of the latent block costing
    /// about as much; a small pass's whole latent block); false once it is ready for
    /// `finish_pass`.
    pub fn step_pass(&self, pass: &mut EmbedPass) -> Result<bool> {
        Ok(self.model.step(&mut pass.pass)?)
    }

    /// Pools a pass whose layers have all run: one unit vector per remaining row, in row order.
    /// Rows are not checked for finiteness here: see `ensure_finite`.
    pub fn finish_pass(&self, pass: &EmbedPass) -> Result<Vec<Vec<f32>>> {
        let mut embeddings = self.model.finish(&pass.pass)?;
        if !self.config.latent_attention_config.output_normalize {
            // The model then returns the raw pooled state; callers of the engine always get unit
            // vectors, as the model card's F.normalize gives them.
            let norms = embeddings.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
            embeddings = embeddings.broadcast_div(&norms)?;
        }
        Ok(embeddings.to_vec2::<f32>()?)
    }

    fn forward(&self, members: &[&EncodedInput]) -> Result<Vec<Vec<f32>>> {
        let mut pass = self.begin_pass(members)?;
        while self.step_pass(&mut pass)? {}
        self.finish_pass(&pass)
    }
}

/// A batch on its way through the model (see `Embedder::begin_pass`). Dropping a pass of at
/// least `TOKEN_CHUNK_ROWS` padded tokens returns the memory its activations used to the OS; a
/// smaller one's few megabytes stay for the next pass (releasing them cost a query ~1 ms).
pub struct EmbedPass {
    pass: Pass,
    /// Declared after `pass`, so dropped after it, once the pass's memory is free.
    _release: ReleaseOnDrop,
}

/// When set, returns the heap's free pages to the OS as it is dropped.
struct ReleaseOnDrop(bool);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if self.0 {
            release_freed_activations();
        }
    }
}

impl EmbedPass {
    pub fn rows(&self) -> usize {
        self.pass.rows()
    }

    /// Padded tokens one decoder layer of this pass processes.
    pub fn padded_tokens(&self) -> usize {
        self.pass.padded_tokens()
    }

    /// Whether the next step is a decoder layer (not a share of the latent block).
    pub fn in_decoder(&self) -> bool {
        self.pass.in_decoder()
    }

    /// Keeps only the rows at `keep` (indices into the current rows, in order): in the decoder
    /// the others stop costing compute from the next layer on; the kept rows' results do not
    /// change.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        Ok(self.pass.retain(keep)?)
    }
}

/// An embedding is returned only if every value is finite: a NaN or infinity (an overflow in a
/// 16-bit dtype, a corrupt checkpoint) would otherwise reach a vector column and poison every
/// distance computed with it.
pub fn ensure_finite(index: usize, vector: &[f32]) -> Result<()> {
    if vector.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite { index })
    }
}

/// Sets the compute thread count; call it before the first model is loaded. Candle's CPU
/// kernels and rayon read this variable when their pool starts, which nothing has done yet.
pub fn set_compute_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::InvalidArgument("the thread count must be at least 1".into()));
    }
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    matmul::set_threads(threads);
    Ok(())
}

/// Activations are large, short-lived buffers, allocated again at every layer. Those of up to
/// `HEAP_BUFFER_BYTES` come from the heap, where the next layer reuses them: in mappings of their
/// own each was faulted in page by page and unmapped again (page faults were ~13 % of a
/// medium-model batch's samples; 8 MiB against 1 MiB ran it 11 % faster for 7 % more peak RSS).
/// Larger ones keep their own mappings. The fixed threshold also stops glibc from raising it
/// after the first large free; with that, and with `release_freed_activations` when a large pass
/// is dropped, an idle model holds its weights and little else (one medium-model batch used to
/// leave +70 % of the weights' size resident).
fn keep_activations_on_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        const HEAP_BUFFER_BYTES: libc::c_int = 8 << 20;
        // SAFETY: mallopt only changes allocator tuning and is safe to call at any time.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BUFFER_BYTES);
        });
    }
}

/// Returns the heap's free pages (those of a pass that was dropped) to the OS.
fn release_freed_activations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Groups input indices into batches: sorted by length, each batch's rows × longest length
/// within `batch_tokens` (an input longer than the budget runs alone).
pub fn plan_batches(inputs: &[EncodedInput], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| inputs[i].ids.len());
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for index in order {
        let longest = inputs[index].ids.len();
        if !current.is_empty() && (current.len() + 1) * longest > batch_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(index);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// One call's texts, tokenized one at a time with one instruction (see `Embedder::text_encoder`).
pub struct TextEncoder<'e> {
    embedder: &'e Embedder,
    instruction: &'e str,
    prefix: usize,
    max_length: usize,
}

impl TextEncoder<'_> {
    /// Tokenizes the call's text number `index`, failing if it would have nothing to pool.
    pub fn encode(&self, index: usize, text: &str) -> Result<EncodedInput> {
        let input = self
            .embedder
            .encoder
            .encode_one(self.instruction, self.prefix, text, self.max_length)?;
        self.embedder.check_poolable_one(index, &input)?;
        Ok(input)
    }
}
