//! Values that the SQL surface, the extension, the model server and the engine must agree on,
//! defined once here (this crate has no heavy dependencies, so every side can link it).

use std::ffi::CStr;

/// File name of the model server's socket, relative to the data directory (the working directory
/// of every Postgres process). Relative, so long data-directory paths never hit the 108-byte
/// limit of socket addresses; private, because the data directory is mode 0700.
pub const SOCKET_NAME: &str = "nvembed.sock";

/// File name of the model server executable, installed beside nvembed.so.
pub const SERVER_EXECUTABLE: &str = "nvembed-model-server";

/// The instruction NV-Embed-v2 was trained with for retrieval queries (the default of
/// `nvembed.query_instruction`, hence also a C string).
pub const QUERY_INSTRUCTION_C: &CStr =
    c"Instruct: Given a question, retrieve passages that answer the question\nQuery: ";
pub const QUERY_INSTRUCTION: &str = match QUERY_INSTRUCTION_C.to_str() {
    Ok(s) => s,
    Err(_) => panic!("the query instruction is UTF-8"),
};
/// A custom task's instruction is `TASK_INSTRUCTION_PREFIX + task + TASK_INSTRUCTION_SUFFIX`,
/// as in the model card.
pub const TASK_INSTRUCTION_PREFIX: &str = "Instruct: ";
pub const TASK_INSTRUCTION_SUFFIX: &str = "\nQuery: ";

/// NV-Embed-v2's position limit and the reference's default truncation, in tokens including
/// `<s>`: the default and the ceiling of `nvembed.max_length` / `nvembed.max_length_limit`.
pub const MAX_LENGTH: usize = 32_768;

/// Default of `nvembed.max_request_tokens`, the most tokens one call may submit. 2^18 tokens is
/// eight texts at the full 32,768-token limit, or a backfill batch of 64 passages of 4,096
/// tokens; for NV-Embed-v2 (~15 GFLOP per token) it is ~4 PFLOP: seconds to minutes on a GPU,
/// hours on a CPU. Bigger jobs are better split into calls that commit as they go.
pub const DEFAULT_MAX_REQUEST_TOKENS: usize = 1 << 18;

/// Default padded-token budget of one forward pass (`nvembed.max_batch_tokens`).
pub const DEFAULT_BATCH_TOKENS: usize = 16_384;

/// Names of the weight dtypes the engine runs (`nvembed.dtype`, `--dtype`): `auto` is the
/// checkpoint's own (what `torch_dtype="auto"` loads: 16-bit for NV-Embed-v2), then explicit ones;
/// `int8` is weight-only int8 quantized at load (CPU), the activations in bf16 or f32.
pub const DTYPE_NAMES: [&str; 5] = [DEFAULT_DTYPE, "f32", "f16", "bf16", "int8"];
/// Whether a server that announces `served` serves what a cluster set as `setting`: the same
/// name, or, for `int8`, `int8-` and the activations' dtype it computes in (`int8-bf16`,
/// `int8-f32`). Two int8 servers that compute in different dtypes give different vectors, so
/// they announce different dtypes and a cluster never mixes them.
pub fn serves_dtype(served: &str, setting: &str) -> bool {
    served == setting || served.split_once('-').is_some_and(|(name, _)| name == setting)
}

/// Default of `nvembed.dtype` and `--dtype`.
pub const DEFAULT_DTYPE_C: &CStr = c"auto";
pub const DEFAULT_DTYPE: &str = match DEFAULT_DTYPE_C.to_str() {
    Ok(s) => s,
    Err(_) => panic!("the default dtype is UTF-8"),
};
/// Names of the compute devices (`nvembed.device`).
pub const DEVICE_NAMES: [&str; 2] = ["cpu", "cuda"];

/// A role without its own `nvembed.max_calls_per_role` may hold this fraction of the model
/// server's connections (1 / this), so no one role can take them all.
pub const DEFAULT_ROLE_SHARE: usize = 4;

/// Defaults of a chunk's length (the model input it makes, in tokens, `<s>` and `</s>`
/// included) and of the tokens consecutive chunks share: `nvembed_chunks`, chunk vectorizers.
/// NV-Embed-v2 was evaluated on passages of 512 tokens.
pub const DEFAULT_CHUNK_TOKENS: usize = 512;
pub const DEFAULT_CHUNK_OVERLAP: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_int8_server_announces_its_activations_and_serves_int8_only() {
        let int8 = DTYPE_NAMES[4];
        assert!(serves_dtype("int8-bf16", int8) && serves_dtype("int8-f32", int8));
        assert!(serves_dtype("bf16", "bf16") && !serves_dtype("bf16", "f32"));
        assert!(!serves_dtype("int8-bf16", "bf16") && !serves_dtype("int8-bf16", "int8-f32"));
        assert!(!serves_dtype("int8", "int") && !serves_dtype("f32", "int8"));
    }
}
