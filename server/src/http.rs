//! The HTTP listener, for every program that is not PostgreSQL: OpenAI's `POST /v1/embeddings`
//! (plus `input_type` and `instruction`) and `GET /v1/models` (the one model served, with its
//! dtype, dimension and revision: how OpenAI clients find the name to ask for), `GET /health`
//! for load balancers and `GET /metrics` for Prometheus. Over TLS unless plaintext was asked for
//! explicitly; every request but `/health` carries a bearer token from the tokens file. A request is a call like the native
//! protocol's: one input is interactive work, several are bulk, admitted by the same connection
//! limits (per client name) and token limit, and dropped from the model when its client leaves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use nvembed_engine::QUERY_INSTRUCTION;
use nvembed_protocol::{EmbedHeader, ErrorKind, WorkClass};

use crate::admission::{check_count, Admission, Refusal, Stop};
use crate::connection::Server;
use crate::limits::Throttled;
use crate::metrics::{render, ModelFacts};
use crate::scheduler::Event;
use crate::stats::Stats;
use crate::tokens::Tokens;

/// Largest request body: a full array of inputs of a few KiB each fits.
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Most inputs in one request (OpenAI's own limit).
pub const MAX_INPUTS: usize = 2048;
/// Time a client has to send its whole request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a request waiting for vectors checks whether its client left.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// What the HTTP listener serves, and to whom.
pub struct HttpSettings {
    pub max_length: usize,
    pub max_request_tokens: usize,
    /// None: no token is asked for (only with `--no-tokens`).
    pub tokens: Option<Arc<Tokens>>,
}

struct App {
    server: Arc<Server>,
    settings: HttpSettings,
    /// When this listener started, in Unix seconds: the `created` of the model it lists.
    started: u64,
}

static REFUSED: Throttled = Throttled::new();

/// An error in OpenAI's shape.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    let body = json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// OpenAI's 404 for a model name this server does not serve.
fn model_not_found(served: &str, asked: &str) -> Response {
    error(StatusCode::NOT_FOUND, "model_not_found", format!("this server serves {served:?}, not {asked:?}"))
}

fn refusal(refused: Refusal) -> Response {
    let (kind, message) = refused;
    match kind {
        ErrorKind::InvalidInput => error(StatusCode::BAD_REQUEST, "invalid_input", message),
        ErrorKind::TooLarge => error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", message),
        ErrorKind::Busy => error(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message),
        ErrorKind::Unauthorized => error(StatusCode::UNAUTHORIZED, "invalid_api_key", message),
        ErrorKind::Load => error(StatusCode::SERVICE_UNAVAILABLE, "model_unavailable", message),
        ErrorKind::NonFinite | ErrorKind::Internal => error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message),
    }
}

impl App {
    /// The client's name from its bearer token; a 401 when the token is missing or unknown.
    #[allow(clippy::result_large_err)] // axum's Response, returned as is
    fn authenticate(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<String, Response> {
        let Some(tokens) = &self.settings.tokens else {
            return Ok(peer.ip().to_canonical().to_string());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match presented.and_then(|token| tokens.check(token)) {
            Some(name) => Ok(name),
            None => {
                Stats::add(&self.server.stats.refused_connections, 1);
                REFUSED.log(|| format!("refusing a request from {peer}: missing or unknown bearer token"));
                Err(error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "missing or unknown bearer token (Authorization: Bearer ...)",
                ))
            }
        }
    }
}

/// `input`: one text or several (token arrays are not accepted).
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    input: Input,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<Value>,
    /// nvembed's extension: `passage` (the default: no instruction) or `query`.
    #[serde(default)]
    input_type: Option<String>,
    /// nvembed's extension: any instruction prefix, overriding `input_type`'s.
    #[serde(default)]
    instruction: Option<String>,
}

/// A validated request.
struct Call {
    texts: Vec<String>,
    instruction: String,
    base64: bool,
}

#[allow(clippy::result_large_err)] // axum's Response, returned as is
fn validate(request: EmbeddingRequest, served_model_name: &str) -> Result<Call, Response> {
    if request.model != served_model_name {
        return Err(model_not_found(served_model_name, &request.model));
    }
    if request.dimensions.is_some() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "dimensions_not_supported",
            "`dimensions` is not supported: NV-Embed-v2 was not trained to be truncated (Matryoshka)",
        ));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_encoding_format",
                format!("encoding_format {other:?} is not one of \"float\", \"base64\""),
            ))
        }
    };
    let texts = match request.input {
        Input::One(text) => vec![text],
        Input::Many(texts) => texts,
    };
    if texts.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "empty_input", "`input` holds no text"));
    }
    if texts.len() > MAX_INPUTS {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "too_many_inputs",
            format!("`input` holds {} texts; at most {MAX_INPUTS} per request", texts.len()),
        ));
    }
    let instruction = match (request.instruction, request.input_type.as_deref()) {
        (Some(instruction), _) => instruction,
        (None, None | Some("passage")) => String::new(),
        (None, Some("query")) => QUERY_INSTRUCTION.to_string(),
        (None, Some(other)) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_input_type",
                format!("input_type {other:?} is not one of \"query\", \"passage\""),
            ))
        }
    };
    Ok(Call {
        texts,
        instruction,
        base64,
    })
}

/// Sets the flag when dropped: the request's future was dropped, its client is gone.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Vectors of the call and its tokens, or why not; None when the client left.
type Computed = Option<Result<(Vec<Vec<f32>>, usize), Refusal>>;

/// Tokenizes, queues and waits for a call, in a blocking thread.
fn compute(server: &Server, client: &str, header: &EmbedHeader, texts: &[String], gone: &AtomicBool) -> Computed {
    let model = match server.model.get(|| gone.load(Ordering::SeqCst)) {
        Ok(Some(model)) => model,
        Ok(None) => return None,
        Err(message) => return Some(Err((ErrorKind::Load, message))),
    };
    let mut admission = match Admission::new(&model, header) {
        Ok(admission) => admission,
        Err(refused) => return Some(Err(refused)),
    };
    // Bulk calls take turns at tokenizing; a one-text call never waits for them.
    let slot = if texts.len() > 1 {
        Some(server.tokenizers.reserve(1, || gone.load(Ordering::SeqCst))?)
    } else {
        None
    };
    match admission.add(texts, || gone.load(Ordering::SeqCst)) {
        Ok(()) => {}
        Err(Stop::Refused(refused)) => return Some(Err(refused)),
        Err(Stop::Gone) => return None,
    }
    drop(slot);
    let inputs = admission.finish();
    let tokens = inputs.iter().map(|input| input.ids.len()).sum();
    let count = inputs.len();
    Stats::add(&server.stats.waiting, 1);
    let handle = server.scheduler.submit(client, header.class, inputs, model);
    // The vectors are gathered here as they come: the client has read them all.
    handle.set_read(count);
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; count];
    let mut received = 0;
    let outcome = loop {
        if received == count {
            Stats::add(&server.stats.requests, 1);
            break Some(Ok((vectors.into_iter().map(|v| v.expect("every row arrived")).collect(), tokens)));
        }
        if gone.load(Ordering::SeqCst) {
            handle.cancel();
            break None;
        }
        match handle.events.recv_timeout(CANCEL_POLL) {
            Ok(Event::Vector { index, vector }) => {
                vectors[index] = Some(vector);
                received += 1;
            }
            Ok(Event::Failed { kind, message }) => break Some(Err((kind, message))),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Some(Err((ErrorKind::Internal, "the scheduler stopped".into()))),
        }
    };
    Stats::sub(&server.stats.waiting, 1);
    outcome
}

async fn embeddings(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Requests count under their own name and, with native connections, under their token's.
    let group = match app.authenticate(&headers, peer) {
        Ok(name) => name,
        Err(response) => return response,
    };
    let client = format!("http:{group}");
    // A request holds a connection slot of its client's share, and room in the text budget
    // for its body (read, then decoded), before its body is read.
    let server = app.server.clone();
    let Some(mut slot) = server.gate.open(server.limits.hard_cap()) else {
        Stats::add(&server.stats.refused_connections, 1);
        return refusal((ErrorKind::Busy, "the model server is at its connection limit".into()));
    };
    if let Err(refused) = slot.admit(&client, None, Some(&group), &server.limits) {
        Stats::add(&server.stats.refused_connections, 1);
        return refusal(refused);
    }
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(MAX_BODY_BYTES)
        .min(MAX_BODY_BYTES);
    let Some(room) = app.server.texts.try_reserve(2 * announced) else {
        return refusal((ErrorKind::Busy, "the model server holds as many request bodies as it may".into()));
    };
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("the request body is larger than {MAX_BODY_BYTES} bytes, or broken"),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
            )
        }
    };
    let request: EmbeddingRequest = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("malformed request: {e}")),
    };
    drop(bytes);
    let call = match validate(request, &app.server.model.settings().served_model_name) {
        Ok(call) => call,
        Err(response) => return response,
    };
    let header = EmbedHeader {
        class: if call.texts.len() == 1 { WorkClass::Interactive } else { WorkClass::Bulk },
        instruction: call.instruction,
        max_length: app.settings.max_length,
        max_request_tokens: app.settings.max_request_tokens,
        count: call.texts.len(),
    };
    if let Err(refused) = check_count(&header) {
        return refusal(refused);
    }
    let gone = Arc::new(AtomicBool::new(false));
    let _cancel_if_dropped = CancelOnDrop(gone.clone());
    let texts = call.texts;
    let model_name = app.server.model.settings().served_model_name.clone();
    let base64 = call.base64;
    // Tokenizing, the model's time and the response's JSON are a blocking thread's work.
    let computed = tokio::task::spawn_blocking(move || {
        let computed = compute(&server, &client, &header, &texts, &gone);
        drop(texts);
        drop(room);
        drop(slot);
        computed.map(|done| done.map(|(vectors, tokens)| response_json(vectors, tokens, &model_name, base64)))
    })
    .await;
    match computed {
        Ok(Some(Ok(json))) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Ok(Some(Err(refused))) => refusal(refused),
        Ok(None) | Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "the call was dropped"),
    }
}

/// One vector: floats, or little-endian f32 bytes in base64 (what OpenAI's clients decode).
#[derive(Serialize)]
#[serde(untagged)]
enum Embedding {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Item {
    object: &'static str,
    index: usize,
    embedding: Embedding,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct EmbeddingResponse<'a> {
    object: &'static str,
    data: Vec<Item>,
    model: &'a str,
    usage: Usage,
}

/// The response body, written straight from the vectors (no JSON tree in between).
fn response_json(vectors: Vec<Vec<f32>>, tokens: usize, model: &str, base64: bool) -> String {
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| Item {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Embedding::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Embedding::Floats(vector)
            },
        })
        .collect();
    let response = EmbeddingResponse {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    serde_json::to_string(&response).expect("vectors and strings always serialize")
}

/// OpenAI's model object for the model served: `id` is the name `/v1/embeddings` asks for; the
/// rest says what it computes (`dtype` is the configured one until the model is loaded, then
/// what was loaded, as `nvembed_status()` shows it).
fn model_object(app: &App) -> Value {
    let status = app.server.status();
    json!({
        "id": app.server.model.settings().served_model_name,
        "object": "model",
        "created": app.started,
        "owned_by": "nvembed",
        "loaded": status.loaded,
        "dtype": status.dtype,
        "device": status.device,
        "dimension": status.dimension,
        "revision": status.revision,
    })
}

async fn models(State(app): State<Arc<App>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    if let Err(response) = app.authenticate(&headers, peer) {
        return response;
    }
    Json(json!({"object": "list", "data": [model_object(&app)]})).into_response()
}

async fn model(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = app.authenticate(&headers, peer) {
        return response;
    }
    let served = &app.server.model.settings().served_model_name;
    if id != *served {
        return model_not_found(served, &id);
    }
    Json(model_object(&app)).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.server.model.health() {
        Ok(loaded) => Json(json!({"status": "ok", "loaded": loaded})).into_response(),
        Err(message) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "error": message}))).into_response()
        }
    }
}

async fn metrics(State(app): State<Arc<App>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    if let Err(response) = app.authenticate(&headers, peer) {
        return response;
    }
    let status = app.server.status();
    let text = render(
        &app.server.stats,
        &ModelFacts {
            load_seconds: status.load_seconds,
            restarts: status.restarts,
        },
    );
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// A connection must send a request's headers within this time of opening, or of its previous
/// request (hyper closes it otherwise).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn with_timeouts(builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
}

/// A TCP connection of the HTTP listener, counted until it closes.
struct Counted<S> {
    stream: S,
    _open: tokio::sync::OwnedSemaphorePermit,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections while fewer than the server's connection limit are open; past it a
/// new connection is closed at once (before TLS), so idle peers cannot take the descriptors
/// that the model, the Unix socket and the served clients need.
#[derive(Clone)]
struct CappedAcceptor {
    open: Arc<tokio::sync::Semaphore>,
}

static HTTP_FULL: Throttled = Throttled::new();

impl<S> axum_server::accept::Accept<tokio::net::TcpStream, S> for CappedAcceptor {
    type Stream = Counted<tokio::net::TcpStream>;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        std::future::ready(match self.open.clone().try_acquire_owned() {
            Ok(permit) => Ok((
                Counted {
                    stream,
                    _open: permit,
                },
                service,
            )),
            Err(_) => {
                let peer = stream.peer_addr().map_or_else(|_| "a peer".to_string(), |a| a.to_string());
                HTTP_FULL.log(|| format!("closing an HTTP connection from {peer}: the listener's connections are all open"));
                Err(std::io::Error::other("the HTTP listener is at its connection limit"))
            }
        })
    }
}

/// How the listener speaks: TLS with a certificate chain and key (PEM), or plaintext.
pub enum Transport {
    Tls { cert: PathBuf, key: PathBuf },
    Plaintext,
}

/// Serves HTTP on `listener` until the process ends.
pub fn serve_http(
    listener: std::net::TcpListener,
    transport: Transport,
    server: Arc<Server>,
    settings: HttpSettings,
) -> std::io::Result<()> {
    let capped = CappedAcceptor {
        open: Arc::new(tokio::sync::Semaphore::new(server.limits.max_connections)),
    };
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let app = Arc::new(App { server, settings, started });
    let router = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        // Model names may hold slashes (`nvidia/NV-Embed-v2`): the rest of the path is the id.
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(app)
        .into_make_service_with_connect_info::<SocketAddr>();
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("http")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match transport {
            Transport::Tls { cert, key } => {
                // ring: one provider for the whole process (installing twice is harmless).
                let _ = rustls::crypto::ring::default_provider().install_default();
                let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
                    .await
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("TLS certificate {} / key {}: {e}", cert.display(), key.display()),
                        )
                    })?;
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config).acceptor(capped);
                let mut server = axum_server::from_tcp(listener).acceptor(acceptor);
                with_timeouts(server.http_builder());
                server.serve(router).await
            }
            Transport::Plaintext => {
                let mut server = axum_server::from_tcp(listener).acceptor(capped);
                with_timeouts(server.http_builder());
                server.serve(router).await
            }
        }
    })
}
