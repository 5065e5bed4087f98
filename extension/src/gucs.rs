//! Configuration. What the model server loads and how it runs are server-wide settings
//! (postgresql.conf, applied on reload: the supervisor restarts the server with them), because
//! one model process serves every session: a session's SET must not switch the model under the
//! others. Limits on what one call may ask are server-wide too; what shapes a single call within
//! them may be set per session.

use std::ffi::{CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

use nvembed_protocol::{
    DEFAULT_BATCH_TOKENS, DEFAULT_DTYPE_C, DEFAULT_MAX_REQUEST_TOKENS, DEVICE_NAMES, DTYPE_NAMES, MAX_LENGTH, QUERY_INSTRUCTION_C,
};

/// Rows a vectorizer worker embeds per model call (and per transaction that writes them).
const DEFAULT_VECTORIZER_BATCH_ROWS: i32 = 64;
/// Attempts at a text before it moves to nvembed_vectorizer_failures.
const DEFAULT_VECTORIZER_MAX_ATTEMPTS: i32 = 5;

pub static MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"nvidia/NV-Embed-v2"));
pub static DTYPE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(DEFAULT_DTYPE_C));
pub static DEVICE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"cpu"));
pub static PRELOAD: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_BATCH_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_BATCH_TOKENS as i32);
pub static MAX_LENGTH_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(MAX_LENGTH as i32);
pub static MAX_REQUEST_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_REQUEST_TOKENS as i32);
pub static MAX_CALLS_PER_ROLE: GucSetting<i32> = GucSetting::<i32>::new(-1);
pub static MAX_LENGTH_SETTING: GucSetting<i32> = GucSetting::<i32>::new(MAX_LENGTH as i32);
pub static VECTORIZER_DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static VECTORIZER_BATCH_ROWS: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_VECTORIZER_BATCH_ROWS);
pub static VECTORIZER_MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_VECTORIZER_MAX_ATTEMPTS);
pub static SERVERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SERVER_TOKEN_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SERVER_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static QUERY_INSTRUCTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(QUERY_INSTRUCTION_C));

/// Accepts only the names in `allowed`, and says which they are.
///
/// # Safety
/// Called by the GUC machinery with a valid (possibly NULL) string.
unsafe fn check_name(newval: *mut *mut std::ffi::c_char, allowed: &[&str]) -> bool {
    // SAFETY: the GUC machinery passes a valid pointer to a NUL-terminated string or NULL.
    let value = unsafe {
        (*newval)
            .as_ref()
            .map(|p| CStr::from_ptr(p).to_string_lossy().into_owned())
    };
    if value.as_deref().is_some_and(|v| allowed.contains(&v)) {
        return true;
    }
    let detail = CString::new(format!("Valid values are: {}.", allowed.join(", "))).expect("no NUL");
    // SAFETY: GUC_check_errdetail_string takes a palloc'd string, as GUC_check_errdetail does.
    unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
    false
}

unsafe extern "C-unwind" fn check_dtype(
    newval: *mut *mut std::ffi::c_char,
    _: *mut *mut std::ffi::c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: called by the GUC machinery.
    unsafe { check_name(newval, &DTYPE_NAMES) }
}

unsafe extern "C-unwind" fn check_device(
    newval: *mut *mut std::ffi::c_char,
    _: *mut *mut std::ffi::c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: called by the GUC machinery.
    unsafe { check_name(newval, &DEVICE_NAMES) }
}

unsafe extern "C-unwind" fn check_servers(
    newval: *mut *mut std::ffi::c_char,
    _: *mut *mut std::ffi::c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery passes a valid pointer to a NUL-terminated string or NULL.
    let value = unsafe {
        (*newval)
            .as_ref()
            .map(|p| CStr::from_ptr(p).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    match crate::endpoints::parse_servers(&value) {
        Ok(_) => true,
        Err(e) => {
            let detail = CString::new(e).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string takes a palloc'd string, as GUC_check_errdetail does.
            unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
            false
        }
    }
}

pub fn register() {
    const RESTARTS: &CStr = c"Set in postgresql.conf; a reload restarts the model server, which loads the model again.";
    GucRegistry::define_string_guc(
        c"nvembed.model",
        c"Model directory or Hugging Face hub id (org/name or org/name@revision) served by the model server.",
        RESTARTS,
        &MODEL,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    // SAFETY: the hooks are valid for the life of the process.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"nvembed.dtype",
            c"Precision of the model weights: auto (the checkpoint's own), f32, f16, bf16 or int8.",
            c"NV-Embed-v2 is stored in 16 bits: auto loads it in about 15 GB, f32 needs about 29 GB, int8 (weight-only, quantized at load, CPU only) about 8 GB. On CPUs with AVX-512 BF16 or AMX, bf16 is the fastest. A reload restarts the model server.",
            &DTYPE,
            GucContext::Sighup,
            GucFlags::empty(),
            Some(check_dtype),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"nvembed.device",
            c"Where the model runs: cpu, or cuda when the model server was built with CUDA.",
            RESTARTS,
            &DEVICE,
            GucContext::Sighup,
            GucFlags::empty(),
            Some(check_device),
            None,
            None,
        );
    }
    // SAFETY: the hook is valid for the life of the process.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"nvembed.servers",
            c"Remote model servers (host:port, comma-separated) that embed for this cluster; empty: its own local server.",
            c"Each server runs nvembed-model-server --listen in TLS. Calls are spread over them by outstanding work and fail over; with servers set no local model server starts.",
            &SERVERS,
            GucContext::Sighup,
            GucFlags::empty(),
            Some(check_servers),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"nvembed.server_token_file",
        c"File holding the bearer token this cluster presents to nvembed.servers.",
        c"Readable by the cluster's OS user only; read again on each new connection.",
        &SERVER_TOKEN_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"nvembed.server_ca_file",
        c"Certificates (PEM) trusted to sign nvembed.servers' certificates; empty: the system's trust store.",
        c"Each server's certificate must be signed by one of them and name the host as written in nvembed.servers.",
        &SERVER_CA_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"nvembed.preload",
        c"Load the model when the model server starts instead of on the first call.",
        c"Lazy loading (off) keeps memory free until nvembed is used.",
        &PRELOAD,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.threads",
        c"Compute threads of the model server (0 = all cores).",
        RESTARTS,
        &THREADS,
        0,
        1024,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.max_batch_tokens",
        c"Padded tokens per forward pass of the model server at most, across all sessions' calls.",
        c"Larger passes amortise weight reads; a single text longer than this still runs. A reload restarts the model server.",
        &MAX_BATCH_TOKENS,
        1,
        1 << 24,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.max_length_limit",
        c"The highest nvembed.max_length a session may use.",
        c"Each token costs compute: NV-Embed-v2 needs about 15 GFLOP per token, more for long texts.",
        &MAX_LENGTH_LIMIT,
        1,
        MAX_LENGTH as i32,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.max_request_tokens",
        c"The most tokens one call may submit (all its texts, after truncation).",
        c"Calls over the limit are refused before any compute.",
        &MAX_REQUEST_TOKENS,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.max_calls_per_role",
        c"Model server connections (open calls) one login role may hold at once; -1: a quarter of the server's limit.",
        c"Each call, and each open cursor over a batch function, holds one. Set per role with ALTER ROLE ... SET.",
        &MAX_CALLS_PER_ROLE,
        -1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.max_length",
        c"Truncation limit in tokens (including <s>) for each text.",
        c"At most nvembed.max_length_limit.",
        &MAX_LENGTH_SETTING,
        1,
        MAX_LENGTH as i32,
        GucContext::Userset,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"nvembed.vectorizer_databases",
        c"Databases (comma-separated) in which background workers embed the vectorizers' queued rows.",
        c"One worker per database; a reload starts and stops them.",
        &VECTORIZER_DATABASES,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.vectorizer_batch_rows",
        c"Rows a vectorizer worker embeds per model call and writes per transaction.",
        c"Larger batches keep the model busier; a crash or a restart redoes at most one batch.",
        &VECTORIZER_BATCH_ROWS,
        1,
        1 << 16,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"nvembed.vectorizer_max_attempts",
        c"Attempts at embedding a row before it is listed in nvembed_vectorizer_failures.",
        c"Failed attempts are retried after 1 s, 2 s, 4 s, ... (at most 10 min).",
        &VECTORIZER_MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Sighup,
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

/// The model server's command line settings; when they change it must be restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub model: String,
    pub dtype: String,
    pub device: String,
    pub preload: bool,
    pub threads: i32,
    pub batch_tokens: i32,
}

pub fn server_settings() -> ServerSettings {
    ServerSettings {
        model: string(&MODEL),
        dtype: string(&DTYPE),
        device: string(&DEVICE),
        preload: PRELOAD.get(),
        threads: THREADS.get(),
        batch_tokens: MAX_BATCH_TOKENS.get(),
    }
}

/// `nvembed.servers` as written (the check hook accepted it).
pub fn servers() -> String {
    string(&SERVERS)
}

/// Where this cluster's token for remote servers is; None when unset.
pub fn server_token_file() -> Option<String> {
    Some(string(&SERVER_TOKEN_FILE)).filter(|f| !f.is_empty())
}

/// The CA certificates remote servers are checked against; None: the system's trust store.
pub fn server_ca_file() -> Option<String> {
    Some(string(&SERVER_CA_FILE)).filter(|f| !f.is_empty())
}

/// The model this session's backend last read from the configuration (to key its cache).
pub fn model() -> String {
    string(&MODEL)
}

pub fn max_length() -> usize {
    MAX_LENGTH_SETTING.get() as usize
}

pub fn max_length_limit() -> usize {
    MAX_LENGTH_LIMIT.get() as usize
}

/// This session's limit on open calls for its login role; None: the server's default.
pub fn max_calls_per_role() -> Option<usize> {
    usize::try_from(MAX_CALLS_PER_ROLE.get()).ok()
}

pub fn max_request_tokens() -> usize {
    MAX_REQUEST_TOKENS.get() as usize
}

/// The databases listed in nvembed.vectorizer_databases, trimmed, without duplicates.
pub fn vectorizer_databases() -> Vec<String> {
    let mut databases: Vec<String> = Vec::new();
    for name in string(&VECTORIZER_DATABASES)
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        if !databases.iter().any(|d| d == name) {
            databases.push(name.to_string());
        }
    }
    databases
}

pub fn vectorizer_batch_rows() -> i32 {
    VECTORIZER_BATCH_ROWS.get()
}
