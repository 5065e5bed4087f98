//! The model server: one process holding one model, answering embedding requests from many
//! clients over a Unix socket (see `nvembed-protocol`). The model is loaded on the first request
//! that needs it, not at start, and reloaded when a request names another model; a failed load
//! is reported to the requests waiting for it and retried by the next one.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvembed_protocol::{read_frame, write_frame, ErrorKind, ModelSpec, Request, Response, Status};

use crate::embedder::{parse_dtype, EmbedOptions, Embedder, DEFAULT_BATCH_TOKENS};
use crate::error::{Error, Result};
use crate::source::ModelSource;

struct Loaded {
    spec: ModelSpec,
    embedder: Embedder,
}

struct State {
    model: Mutex<Option<Loaded>>,
    requests: AtomicU64,
    tokens: AtomicU64,
    waiting: AtomicU64,
    restarts: u64,
}

fn device(name: &str) -> Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0).map_err(Error::from),
        other => Err(Error::InvalidArgument(format!("unknown device {other:?} (expected cpu or cuda)"))),
    }
}

fn load(spec: &ModelSpec) -> Result<Embedder> {
    let files = ModelSource::parse(&spec.model).resolve()?;
    Embedder::load(&files, parse_dtype(&spec.dtype)?, &device(&spec.device)?)
}

fn error_response(error: &Error, during_load: bool) -> Response {
    let kind = match error {
        _ if during_load => ErrorKind::Load,
        Error::NothingToPool { .. } | Error::InvalidArgument(_) | Error::Encode(_) => ErrorKind::InvalidInput,
        _ => ErrorKind::Internal,
    };
    Response::Error {
        kind,
        message: error.to_string(),
    }
}

impl State {
    fn embed(&self, spec: ModelSpec, instruction: &str, texts: &[String], max_length: usize) -> Response {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if guard.as_ref().is_none_or(|loaded| loaded.spec != spec) {
            *guard = None; // free the old model before loading another
            match load(&spec) {
                Ok(embedder) => *guard = Some(Loaded { spec, embedder }),
                Err(e) => return error_response(&e, true),
            }
        }
        let embedder = &guard.as_ref().expect("loaded above").embedder;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let options = EmbedOptions {
            max_length,
            batch_tokens: DEFAULT_BATCH_TOKENS,
        };
        match embedder.embed_with_progress(instruction, &refs, &options, |_| {}) {
            Ok((vectors, stats)) => {
                self.requests.fetch_add(1, Ordering::SeqCst);
                self.tokens.fetch_add(stats.tokens as u64, Ordering::SeqCst);
                Response::Embeddings(vectors)
            }
            Err(e) => error_response(&e, false),
        }
    }

    fn status(&self) -> Status {
        let mut status = Status {
            requests: self.requests.load(Ordering::SeqCst),
            tokens: self.tokens.load(Ordering::SeqCst),
            waiting: self.waiting.load(Ordering::SeqCst),
            restarts: self.restarts,
            pid: std::process::id(),
            ..Status::default()
        };
        // A status query must not wait behind a long batch: report what is known without it.
        if let Ok(guard) = self.model.try_lock() {
            if let Some(loaded) = guard.as_ref() {
                status.loaded = true;
                status.model = Some(loaded.spec.model.clone());
                status.dtype = Some(loaded.spec.dtype.clone());
                status.device = Some(loaded.spec.device.clone());
                status.dimension = Some(loaded.embedder.embedding_dim());
                status.load_seconds = Some(loaded.embedder.load_seconds());
            }
        }
        status
    }
}

/// Serves one client until it hangs up or sends something that is not a request.
fn serve_client(mut stream: UnixStream, state: &State) {
    while let Ok(request) = read_frame::<Request>(&mut stream) {
        let response = match request {
            Request::Embed {
                spec,
                instruction,
                texts,
                max_length,
            } => state.embed(spec, &instruction, &texts, max_length),
            Request::Status => Response::Status(state.status()),
        };
        if write_frame(&mut stream, &response).is_err() {
            return; // the client gave up (cancelled): its result is discarded
        }
    }
}

/// Listens on `socket` (replacing a stale socket file) until the process is killed.
/// `restarts` is how many times the supervisor has restarted the server, reported in status.
pub fn serve(socket: &Path, restarts: u64) -> Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(socket, e)),
    }
    let listener = UnixListener::bind(socket).map_err(|e| Error::io(socket, e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| Error::io(socket, e))?;
    let state = Arc::new(State {
        model: Mutex::new(None),
        requests: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        restarts,
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let state = state.clone();
        std::thread::spawn(move || serve_client(stream, &state));
    }
    Ok(())
}
