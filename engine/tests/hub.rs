//! The hub path for real: `hf-hub` downloads the fixture from a local HTTP server that speaks the
//! hub's URL layout and headers, into an `HF_HOME` cache; then `HF_HUB_OFFLINE` uses that cache.
//! One test in this binary, because it sets process-wide environment variables.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use nvembed_engine::{DType, Device, EmbedOptions, Embedder, ModelSource, PASSAGE_INSTRUCTION};

const REPO: &str = "nvidia-test/nv-embed-tiny";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `GET /{REPO}/resolve/main/{file}` from the fixture directory, honouring `Range`.
fn serve_fixture(listener: TcpListener, requests: Arc<AtomicUsize>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        requests.fetch_add(1, Ordering::SeqCst);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut range: Option<(usize, Option<usize>)> = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(spec) = lower.strip_prefix("range: bytes=") {
                let (a, b) = spec.trim().split_once('-').unwrap();
                range = Some((a.parse().unwrap(), b.parse().ok()));
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
        let prefix = format!("/{REPO}/resolve/main/");
        let file = path.strip_prefix(&prefix).map(|f| fixture_dir().join(f));
        let body = file.and_then(|f| std::fs::read(f).ok());
        let response = match body {
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            Some(bytes) => {
                let (start, end) = match range {
                    Some((a, b)) => (a, b.unwrap_or(bytes.len() - 1).min(bytes.len() - 1)),
                    None => (0, bytes.len() - 1),
                };
                let slice = &bytes[start..=end];
                let etag = format!("{:x}-{}", bytes.len(), path.len());
                let mut head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\
                     ETag: \"{etag}\"\r\nx-repo-commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                    slice.len(),
                    bytes.len()
                )
                .into_bytes();
                head.extend_from_slice(slice);
                head
            }
        };
        let _ = stream.write_all(&response);
        let _ = reader.read(&mut [0u8; 0]);
    }
}

#[test]
fn hub_download_then_offline_cache() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || serve_fixture(listener, counter));

    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::remove_var("HF_HUB_OFFLINE");

    let files = ModelSource::parse(REPO).resolve().expect("download from the local hub");
    assert!(files.config.starts_with(home.path().join("hub")), "{:?}", files.config);
    assert_eq!(files.weights.len(), 2, "both shards listed in the index");
    let downloaded = Embedder::load(&files, DType::F32, &Device::Cpu).unwrap();
    let reference = Embedder::load(&ModelSource::Dir(fixture_dir()).resolve().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let a = downloaded.embed(PASSAGE_INSTRUCTION, &["hello"], &EmbedOptions::default()).unwrap();
    let b = reference.embed(PASSAGE_INSTRUCTION, &["hello"], &EmbedOptions::default()).unwrap();
    assert_eq!(a, b);
    assert!(requests.load(Ordering::SeqCst) >= 5);

    // Offline: served from the cache without a single request.
    let before = requests.load(Ordering::SeqCst);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let cached = ModelSource::parse(REPO).resolve().expect("offline from cache");
    assert_eq!(cached, files);
    assert_eq!(requests.load(Ordering::SeqCst), before);

    // Offline and not cached: a clear error naming the repo and the setting.
    let err = ModelSource::parse("nvidia-test/not-cached").resolve().unwrap_err().to_string();
    assert!(err.contains("nvidia-test/not-cached") && err.contains("HF_HUB_OFFLINE"), "{err}");

    // Online, unknown repo: the server's 404 is reported with the file name.
    std::env::remove_var("HF_HUB_OFFLINE");
    let err = ModelSource::parse("nvidia-test/absent").resolve().unwrap_err().to_string();
    assert!(err.contains("nvidia-test/absent") && err.contains("config.json"), "{err}");
}
