//! The HTTP listener over TLS with bearer tokens, on the tiny fixture: OpenAI's embeddings
//! response with the engine's own vectors (float and base64, queries and passages), the model
//! list, errors in OpenAI's shape with the right status, the health and metrics endpoints, tokens re-read on
//! SIGHUP, and a client that never finishes its request holding up nobody.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use nvembed_engine::{DType, Device, EmbedOptions, Embedder, ModelSource, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION};
use nvembed_server::http::{serve_http, HttpSettings, Transport};
use nvembed_server::limits::{Limits, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use nvembed_server::tokens::Tokens;

mod common;
use common::{fixture, tiny_server};

const TOKEN: &str = "3f9a1c77e2b04d5e8a61";
const NAME: &str = common::SERVED_NAME;

struct Running {
    url: String,
    agent: ureq::Agent,
    tokens_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// A TLS server with one token, in this process, and a client that trusts its certificate.
fn start(max_request_tokens: usize) -> Running {
    start_with(max_request_tokens, 64)
}

fn start_with(max_request_tokens: usize, max_connections: usize) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, roots) = common::localhost_certificate(dir.path());
    let tokens_file = dir.path().join("tokens");
    std::fs::write(&tokens_file, format!("test-client {TOKEN}\n")).unwrap();
    let server = tiny_server(Limits {
        max_connections,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let settings = HttpSettings {
        max_length: 512,
        max_request_tokens,
        tokens: Some(Arc::new(Tokens::load(&tokens_file).unwrap())),
    };
    nvembed_server::tokens::reload_on_sighup(settings.tokens.clone().unwrap()).unwrap();
    std::thread::spawn(move || serve_http(listener, Transport::Tls { cert, key }, server, settings));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let agent = ureq::AgentBuilder::new().tls_config(Arc::new(client)).build();
    let running = Running {
        url: format!("https://localhost:{port}"),
        agent,
        tokens_file,
        _dir: dir,
    };
    let started = Instant::now();
    while running.agent.get(&format!("{}/health", running.url)).call().is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "the HTTP listener did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

/// Status and JSON body of a POST to /v1/embeddings.
fn post(running: &Running, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = running
        .agent
        .post(&format!("{}/v1/embeddings", running.url))
        .set("Content-Type", "application/json");
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    match request.send_string(body) {
        Ok(response) => (response.status(), response.into_json().unwrap()),
        Err(ureq::Error::Status(status, response)) => (status, response.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

/// The metrics text, read with the token.
fn metrics(running: &Running) -> String {
    running
        .agent
        .get(&format!("{}/metrics", running.url))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

fn engine() -> Embedder {
    let files = ModelSource::Dir(fixture()).resolve().unwrap();
    Embedder::load(&files, DType::F32, &Device::Cpu).unwrap()
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn error_of(status: u16, body: &Value) -> (u16, String, String) {
    let error = &body["error"];
    (
        status,
        error["code"].as_str().unwrap_or_default().to_string(),
        error["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn embeddings_over_tls_are_the_engines_in_openais_shape() {
    let running = start(1 << 18);
    let engine = engine();
    let texts = ["The lighthouse beam sweeps across the water.", "Boats at sea", ""];
    let (status, body) = post(&running, Some(TOKEN), &json!({"input": texts, "model": NAME}).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], NAME);
    let options = EmbedOptions {
        max_length: 512,
        ..EmbedOptions::default()
    };
    let want = engine.embed(PASSAGE_INSTRUCTION, &texts, &options).unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert!(max_abs_diff(&floats(&item["embedding"]), &want[i]) <= 1e-6, "row {i}");
    }
    let refs: Vec<&str> = texts.to_vec();
    let tokens: usize = engine.encode(PASSAGE_INSTRUCTION, &refs, 512).unwrap().iter().map(|i| i.ids.len()).sum();
    assert_eq!(body["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}));

    // One string, as a query, in base64 (little-endian f32, as OpenAI's clients decode it).
    let question = "where is the lighthouse?";
    let request = json!({"input": question, "model": NAME, "input_type": "query", "encoding_format": "base64"});
    let (status, body) = post(&running, Some(TOKEN), &request.to_string());
    assert_eq!(status, 200, "{body}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let got: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let want = engine.embed(QUERY_INSTRUCTION, &[question], &options).unwrap();
    assert!(max_abs_diff(&got, &want[0]) <= 1e-6);
    // An instruction of the caller's own.
    let task = "Instruct: Given a claim, find evidence\nQuery: ";
    let (status, body) = post(&running, Some(TOKEN), &json!({"input": [question], "model": NAME, "instruction": task}).to_string());
    assert_eq!(status, 200, "{body}");
    let want = engine.embed(task, &[question], &options).unwrap();
    assert!(max_abs_diff(&floats(&body["data"][0]["embedding"]), &want[0]) <= 1e-6);
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status_before_any_compute() {
    let running = start(600);
    let ok = json!({"input": ["a"], "model": NAME}).to_string();
    let cases: Vec<(Option<&str>, String, u16, &str, &str)> = vec![
        (None, ok.clone(), 401, "invalid_api_key", "missing or unknown bearer token"),
        (Some("3f9a1c77e2b04d5e8a62"), ok.clone(), 401, "invalid_api_key", "missing or unknown bearer token"),
        (Some(TOKEN), "{\"input\": [\"a\"".into(), 400, "invalid_json", "malformed request"),
        (Some(TOKEN), json!({"input": [[1, 2, 3]], "model": NAME}).to_string(), 400, "invalid_json", "malformed request"),
        (Some(TOKEN), json!({"input": ["a"], "model": "text-embedding-3-small"}).to_string(), 404, "model_not_found", "this server serves \"nvembed-tiny-a\""),
        (Some(TOKEN), json!({"input": ["a"], "model": NAME, "dimensions": 256}).to_string(), 400, "dimensions_not_supported", "not trained to be truncated"),
        (Some(TOKEN), json!({"input": ["a"], "model": NAME, "encoding_format": "hex"}).to_string(), 400, "invalid_encoding_format", "\"hex\""),
        (Some(TOKEN), json!({"input": ["a"], "model": NAME, "input_type": "document"}).to_string(), 400, "invalid_input_type", "\"document\""),
        (Some(TOKEN), json!({"input": [], "model": NAME}).to_string(), 400, "empty_input", "holds no text"),
        (Some(TOKEN), json!({"input": vec!["a"; 2049], "model": NAME}).to_string(), 400, "too_many_inputs", "at most 2048"),
        (Some(TOKEN), json!({"input": vec!["boats at sea"; 200], "model": NAME}).to_string(), 413, "request_too_large", "more than nvembed.max_request_tokens (600)"),
        (Some(TOKEN), json!({"input": ["x".repeat(17 << 20)], "model": NAME}).to_string(), 413, "request_too_large", "larger than 16777216 bytes"),
    ];
    for (token, body, status, code, message) in cases {
        let (got_status, got) = post(&running, token, &body);
        let (got_status, got_code, got_message) = error_of(got_status, &got);
        assert_eq!((got_status, got_code.as_str()), (status, code), "{got_message}");
        assert!(got_message.contains(message), "{got_message}");
        assert_eq!(
            got["error"]["type"],
            if status >= 500 { "server_error" } else { "invalid_request_error" }
        );
    }
    let metrics = metrics(&running);
    // Nothing above reached the model.
    assert!(!metrics.contains("nvembed_rows_total{"), "{metrics}");
    assert!(metrics.contains("nvembed_refused_connections_total 2"), "{metrics}");
}

/// Status and JSON body of a GET with the token.
fn get(running: &Running, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = running.agent.get(&format!("{}{path}", running.url));
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    match request.call() {
        Ok(response) => (response.status(), response.into_json().unwrap()),
        Err(ureq::Error::Status(status, response)) => (status, response.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn models_lists_the_served_model_with_what_it_computes() {
    let running = start(1 << 18);
    let (status, before) = get(&running, "/v1/models", Some(TOKEN));
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["object"], "list");
    let listed = &before["data"][0];
    assert_eq!(before["data"].as_array().unwrap().len(), 1);
    assert_eq!((listed["id"].as_str(), listed["object"].as_str(), listed["owned_by"].as_str()), (Some(NAME), Some("model"), Some("nvembed")));
    assert!(listed["created"].as_u64().unwrap() > 1_700_000_000, "{listed}");
    // Not loaded yet: the configured dtype, no dimension.
    assert_eq!((listed["loaded"].as_bool(), listed["dimension"].is_null()), (Some(false), true), "{listed}");
    let dtype = listed["dtype"].as_str().unwrap().to_string();

    // The name it lists is the one /v1/embeddings takes; once loaded, it says what was loaded.
    let (status, body) = post(&running, Some(TOKEN), &json!({"input": "c", "model": listed["id"]}).to_string());
    assert_eq!(status, 200, "{body}");
    let (status, one) = get(&running, &format!("/v1/models/{NAME}"), Some(TOKEN));
    assert_eq!(status, 200, "{one}");
    let dimension = engine().embedding_dim() as u64;
    assert_eq!((one["id"].as_str(), one["loaded"].as_bool(), one["dimension"].as_u64()), (Some(NAME), Some(true), Some(dimension)));
    assert_eq!(one["dtype"], dtype, "the test server loads its configured dtype");
    assert!(one["revision"].as_str().is_some_and(|r| !r.is_empty()), "{one}");

    // Another name, slashes included, is OpenAI's 404; without a token, its 401.
    let (status, body) = get(&running, "/v1/models/nvidia/NV-Embed-v2", Some(TOKEN));
    let message = format!("this server serves {NAME:?}, not \"nvidia/NV-Embed-v2\"");
    assert_eq!(error_of(status, &body), (404, "model_not_found".into(), message));
    let (status, body) = get(&running, "/v1/models", None);
    assert_eq!(error_of(status, &body).0, 401);
    assert_eq!(error_of(status, &body).1, "invalid_api_key");
}

#[test]
fn health_and_metrics_are_served_and_tokens_are_reread_on_sighup() {
    let running = start(1 << 18);
    let health: Value = running.agent.get(&format!("{}/health", running.url)).call().unwrap().into_json().unwrap();
    assert_eq!(health, json!({"status": "ok", "loaded": false}));
    let (status, _) = post(&running, Some(TOKEN), &json!({"input": ["a", "b"], "model": NAME}).to_string());
    assert_eq!(status, 200);
    let (status, _) = post(&running, Some(TOKEN), &json!({"input": "c", "model": NAME}).to_string());
    assert_eq!(status, 200);
    let health: Value = running.agent.get(&format!("{}/health", running.url)).call().unwrap().into_json().unwrap();
    assert_eq!(health, json!({"status": "ok", "loaded": true}));
    match running.agent.get(&format!("{}/metrics", running.url)).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("metrics without a token: {other:?}"),
    }
    let metrics = metrics(&running);
    for line in [
        "nvembed_rows_total{class=\"bulk\"} 2",
        "nvembed_rows_total{class=\"interactive\"} 1",
        "nvembed_calls_total{class=\"bulk\"} 1",
        "nvembed_pass_seconds_count{class=\"interactive\"} 1",
        "nvembed_pass_rows_sum{class=\"bulk\"} 2.0",
        "nvembed_pass_rows_count{class=\"bulk\"} 1",
        "nvembed_pass_rows_sum{class=\"interactive\"} 1.0",
        "nvembed_queued_calls 0",
        "# TYPE nvembed_pass_seconds histogram",
        "nvembed_restarts 0",
    ] {
        assert!(metrics.contains(line), "{line:?} missing in\n{metrics}");
    }
    assert!(metrics.lines().any(|l| l.starts_with("nvembed_model_load_seconds ") && !l.ends_with(" 0.0")), "{metrics}");

    // A new token file, read on SIGHUP: the old token is refused, the new one accepted.
    let fresh = "9c0d5e1f2a3b4c5d6e7f";
    std::fs::write(&running.tokens_file, format!("rotated {fresh}\n")).unwrap();
    // SAFETY: signalling this process, whose tokens are re-read on SIGHUP.
    unsafe { libc::raise(libc::SIGHUP) };
    let started = Instant::now();
    while post(&running, Some(TOKEN), &json!({"input": "d", "model": NAME}).to_string()).0 != 401 {
        assert!(started.elapsed() < Duration::from_secs(5), "the old token still works");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(post(&running, Some(fresh), &json!({"input": "d", "model": NAME}).to_string()).0, 200);
}

#[test]
fn a_client_that_never_finishes_its_request_holds_up_nobody() {
    let running = start(1 << 18);
    // Plain TCP that starts a TLS handshake's worth of garbage and stops, and one that stops
    // in the middle of nothing at all.
    let port = running.url.rsplit(':').next().unwrap().to_string();
    let mut stalled: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap())
        .collect();
    for stream in stalled.iter_mut().step_by(2) {
        stream.write_all(&[0x16, 0x03, 0x01]).unwrap();
    }
    let started = Instant::now();
    let (status, body) = post(&running, Some(TOKEN), &json!({"input": ["a", "b"], "model": NAME}).to_string());
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The stalled connections are closed: a TLS handshake and a request's headers have 10 s.
    for stream in stalled.iter_mut() {
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 64];
        let closed = loop {
            match std::io::Read::read(stream, &mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "a stalled connection was kept");
    }
    assert!(started.elapsed() < Duration::from_secs(15), "stalled connections kept {:?}", started.elapsed());
}

/// Whether the server closed `stream` (EOF or reset) within a short wait.
fn closed(stream: &mut std::net::TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 16];
    match std::io::Read::read(stream, &mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn the_listener_keeps_at_most_its_connection_limit_of_tcp_connections_open() {
    let running = start_with(1 << 18, 4);
    let port = running.url.rsplit(':').next().unwrap().to_string();
    // Ten idle connections to a listener of four (the client's agent may hold one more).
    let mut idle: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let kept = idle.iter_mut().map(closed).filter(|&gone| !gone).count();
    assert!(kept <= 4, "{kept} of 10 idle connections kept open past the limit of 4");
    assert!(kept >= 3, "only {kept} connections admitted");
    // Once they leave, requests are served again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(100));
    let (status, body) = post(&running, Some(TOKEN), &json!({"input": "a", "model": NAME}).to_string());
    assert_eq!(status, 200, "{body}");
}
