//! Configuration. What the model process loads is superuser-only (a model path is a file-read
//! primitive); what shapes a single request may be set per session.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PostgresGucEnum;

use nvembed_protocol::ModelSpec;

/// The position limit of NV-Embed-v2 (and the reference's default truncation).
pub const MAX_LENGTH_LIMIT: i32 = 32_768;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub enum Dtype {
    #[name = c"f32"]
    F32,
    #[name = c"f16"]
    F16,
    #[name = c"bf16"]
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub enum ComputeDevice {
    #[name = c"cpu"]
    Cpu,
    #[name = c"cuda"]
    Cuda,
}

pub static MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"nvidia/NV-Embed-v2"));
pub static DTYPE: GucSetting<Dtype> = GucSetting::<Dtype>::new(Dtype::F32);
pub static DEVICE: GucSetting<ComputeDevice> = GucSetting::<ComputeDevice>::new(ComputeDevice::Cpu);
pub static THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_BATCH_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(16_384);
pub static MAX_LENGTH: GucSetting<i32> = GucSetting::<i32>::new(MAX_LENGTH_LIMIT);
pub static QUERY_INSTRUCTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(
    c"Instruct: Given a question, retrieve passages that answer the question\nQuery: ",
));

pub fn register() {
    GucRegistry::define_string_guc(
        c"nvembed.model",
        c"Model directory or Hugging Face hub id served by the model process.",
        c"Superuser only. Changing it makes the model process load the new model on the next call.",
        &MODEL,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_enum_guc(
        c"nvembed.dtype",
        c"Precision of the model weights: f32, f16 or bf16.",
        c"bf16 halves memory (about 15 GB for NV-Embed-v2) at a small accuracy cost.",
        &DTYPE,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_enum_guc(
        c"nvembed.device",
        c"Where the model runs: cpu, or cuda when the model server was built with CUDA.",
        c"",
        &DEVICE,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.threads",
        c"Compute threads of the model process (0 = all cores).",
        c"Takes effect when the model process restarts, which a configuration reload triggers.",
        &THREADS,
        0,
        1024,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.max_batch_tokens",
        c"Padded tokens per forward pass of the model process, across all sessions' requests.",
        c"Larger batches amortise weight reads; a single text longer than this still runs. \
          Takes effect when the model process restarts, which a configuration reload triggers.",
        &MAX_BATCH_TOKENS,
        1,
        1 << 24,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.max_length",
        c"Truncation limit in tokens (including <s>) for each text.",
        c"",
        &MAX_LENGTH,
        1,
        MAX_LENGTH_LIMIT,
        GucContext::Userset,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"nvembed.query_instruction",
        c"Instruction prepended by nvembed_query(text).",
        c"",
        &QUERY_INSTRUCTION,
        GucContext::Userset,
        GucFlags::empty(),
    );
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The model this session asks for.
pub fn model_spec() -> ModelSpec {
    ModelSpec {
        model: string(&MODEL),
        dtype: match DTYPE.get() {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
        .to_string(),
        device: match DEVICE.get() {
            ComputeDevice::Cpu => "cpu",
            ComputeDevice::Cuda => "cuda",
        }
        .to_string(),
    }
}

/// The model process' settings; when they change it must be restarted.
pub fn server_settings() -> (i32, i32) {
    (THREADS.get(), MAX_BATCH_TOKENS.get())
}

pub fn max_length() -> usize {
    MAX_LENGTH.get() as usize
}
