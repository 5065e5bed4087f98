//! The model server: one process holding one model, answering embedding requests from many
//! clients over a Unix socket (see `nvembed-protocol`).
//!
//! Connections are served by one thread each; the model by a single batching thread. Whatever
//! requests are queued when the model becomes free — from any number of sessions — go through
//! it together, length-sorted and cut into forward passes by a padded-token budget. A request
//! that finds the model idle starts at once: nothing ever waits for company. The model is loaded
//! by the first request that needs it and reloaded when a request names another one; a failed
//! load is reported to the requests that waited for it and retried by the next one. A request
//! whose client hung up before its batch started is dropped.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nvembed_protocol::{read_frame, write_frame, ErrorKind, ModelSpec, Request, Response, Status};

use crate::embedder::{parse_dtype, Embedder};
use crate::encoding::EncodedInput;
use crate::error::{Error, Result};
use crate::source::ModelSource;

/// How often a connection waiting for its result checks whether its client hung up.
const HANGUP_POLL: Duration = Duration::from_millis(50);

struct Job {
    spec: ModelSpec,
    instruction: String,
    texts: Vec<String>,
    max_length: usize,
    cancelled: Arc<AtomicBool>,
    reply: mpsc::Sender<Response>,
}

/// What status reports about the loaded model, readable while a batch runs.
#[derive(Default, Clone)]
struct LoadedInfo {
    spec: Option<ModelSpec>,
    dimension: Option<usize>,
    load_seconds: Option<f64>,
}

struct State {
    queue: Mutex<VecDeque<Job>>,
    queued: Condvar,
    loaded: Mutex<LoadedInfo>,
    requests: AtomicU64,
    tokens: AtomicU64,
    /// Requests queued or in the batch being computed.
    waiting: AtomicU64,
    restarts: u64,
    batch_tokens: usize,
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

fn error_response(kind: ErrorKind, error: &Error) -> Response {
    Response::Error {
        kind,
        message: error.to_string(),
    }
}

fn input_error_kind(error: &Error) -> ErrorKind {
    match error {
        Error::NothingToPool { .. } | Error::InvalidArgument(_) | Error::Encode(_) => ErrorKind::InvalidInput,
        _ => ErrorKind::Internal,
    }
}

impl State {
    /// Takes every queued job for the model the oldest one wants; others stay queued, in order.
    fn next_group(&self) -> Vec<Job> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while queue.is_empty() {
            queue = self.queued.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
        let spec = queue[0].spec.clone();
        let (group, rest): (VecDeque<Job>, VecDeque<Job>) = queue.drain(..).partition(|j| j.spec == spec);
        *queue = rest;
        group.into_iter().collect()
    }

    fn run_batches(&self) {
        let mut model: Option<(ModelSpec, Embedder)> = None;
        loop {
            let group = self.next_group();
            let group: Vec<Job> = group
                .into_iter()
                .filter(|job| {
                    let keep = !job.cancelled.load(Ordering::SeqCst);
                    if !keep {
                        self.waiting.fetch_sub(1, Ordering::SeqCst);
                    }
                    keep
                })
                .collect();
            if group.is_empty() {
                continue;
            }
            let spec = group[0].spec.clone();
            if model.as_ref().is_none_or(|(loaded, _)| *loaded != spec) {
                model = None; // free the old model before loading another
                *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = LoadedInfo::default();
                match load(&spec) {
                    Ok(embedder) => {
                        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = LoadedInfo {
                            spec: Some(spec.clone()),
                            dimension: Some(embedder.embedding_dim()),
                            load_seconds: Some(embedder.load_seconds()),
                        };
                        model = Some((spec, embedder));
                    }
                    Err(e) => {
                        self.finish(group, |_| error_response(ErrorKind::Load, &e));
                        continue;
                    }
                }
            }
            let (_, embedder) = model.as_ref().expect("loaded above");
            self.embed_group(embedder, group);
        }
    }

    /// Embeds every job of `group` in shared forward passes and answers each.
    fn embed_group(&self, embedder: &Embedder, group: Vec<Job>) {
        let mut inputs: Vec<EncodedInput> = Vec::new();
        let mut spans: Vec<std::result::Result<std::ops::Range<usize>, Response>> = Vec::new();
        for job in &group {
            let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
            match embedder.encode(&job.instruction, &texts, job.max_length) {
                Ok(encoded) => {
                    let start = inputs.len();
                    inputs.extend(encoded);
                    spans.push(Ok(start..inputs.len()));
                }
                Err(e) => spans.push(Err(error_response(input_error_kind(&e), &e))),
            }
        }
        match embedder.embed_encoded(&inputs, self.batch_tokens) {
            Ok((mut vectors, stats)) => {
                self.tokens.fetch_add(stats.tokens as u64, Ordering::SeqCst);
                let mut spans = spans.into_iter();
                self.finish(group, |_| match spans.next().expect("one span per job") {
                    Ok(range) => Response::Embeddings(vectors[range].iter_mut().map(std::mem::take).collect()),
                    Err(response) => response,
                });
            }
            Err(e) => self.finish(group, |_| error_response(ErrorKind::Internal, &e)),
        }
    }

    fn finish(&self, group: Vec<Job>, mut response: impl FnMut(&Job) -> Response) {
        for job in group {
            let answer = response(&job);
            if matches!(answer, Response::Embeddings(_)) {
                self.requests.fetch_add(1, Ordering::SeqCst);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = job.reply.send(answer); // the client may have gone: its result is discarded
        }
    }

    fn status(&self) -> Status {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Status {
            loaded: loaded.spec.is_some(),
            model: loaded.spec.as_ref().map(|s| s.model.clone()),
            dtype: loaded.spec.as_ref().map(|s| s.dtype.clone()),
            device: loaded.spec.as_ref().map(|s| s.device.clone()),
            dimension: loaded.dimension,
            load_seconds: loaded.load_seconds,
            requests: self.requests.load(Ordering::SeqCst),
            tokens: self.tokens.load(Ordering::SeqCst),
            waiting: self.waiting.load(Ordering::SeqCst),
            restarts: self.restarts,
            pid: std::process::id(),
        }
    }
}

/// Whether the peer closed its end (a cancelled backend drops its connection).
fn hung_up(stream: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: peeking one byte into a valid buffer on an open socket.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Serves one client until it hangs up or sends something that is not a request.
fn serve_client(mut stream: UnixStream, state: &State) {
    while let Ok(request) = read_frame::<Request>(&mut stream) {
        let response = match request {
            Request::Status => Response::Status(state.status()),
            Request::Embed {
                spec,
                instruction,
                texts,
                max_length,
            } => {
                let (reply, answer) = mpsc::channel();
                let cancelled = Arc::new(AtomicBool::new(false));
                state.waiting.fetch_add(1, Ordering::SeqCst);
                state.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(Job {
                    spec,
                    instruction,
                    texts,
                    max_length,
                    cancelled: cancelled.clone(),
                    reply,
                });
                state.queued.notify_one();
                loop {
                    match answer.recv_timeout(HANGUP_POLL) {
                        Ok(response) => break response,
                        Err(RecvTimeoutError::Timeout) if hung_up(&stream) => {
                            cancelled.store(true, Ordering::SeqCst);
                            return;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        };
        if write_frame(&mut stream, &response).is_err() {
            return;
        }
    }
}

/// Listens on `socket` (replacing a stale socket file) until the process is killed.
/// `restarts` is how many times the supervisor has restarted the server, reported in status;
/// `batch_tokens` bounds the padded tokens of one forward pass.
pub fn serve(socket: &Path, restarts: u64, batch_tokens: usize) -> Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(socket, e)),
    }
    let listener = UnixListener::bind(socket).map_err(|e| Error::io(socket, e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| Error::io(socket, e))?;
    let state = Arc::new(State {
        queue: Mutex::new(VecDeque::new()),
        queued: Condvar::new(),
        loaded: Mutex::new(LoadedInfo::default()),
        requests: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        restarts,
        batch_tokens,
    });
    let batcher = state.clone();
    std::thread::spawn(move || batcher.run_batches());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let state = state.clone();
        std::thread::spawn(move || serve_client(stream, &state));
    }
    Ok(())
}
