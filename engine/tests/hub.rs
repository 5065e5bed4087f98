//! The hub path for real: `hf-hub` downloads the fixture from a local HTTP server that speaks the
//! hub's URL layout and headers, into an `HF_HOME` cache; then `HF_HUB_OFFLINE` uses that cache.
//! Pinned revisions (`org/name@rev`) are resolved against caches laid out by hand.
//! Tests that set the process-wide `HF_*` variables hold `ENV` so they never interleave.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use common::*;
use nvembed_engine::{DType, Device, EmbedOptions, Embedder, Error, ModelFiles, ModelSource, PASSAGE_INSTRUCTION};

const REPO: &str = "nvidia-test/nv-embed-tiny";
/// The commit the server reports for `main`.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The commit the server reports for the tag `v1`.
const V1_COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

static ENV: Mutex<()> = Mutex::new(());

/// Serialises the tests that touch `HF_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`.
fn env_lock() -> MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves `GET /{REPO}/resolve/{main,v1}/{file}` from the fixture directory, honouring `Range`,
/// with the commit of that revision in `x-repo-commit`. Records each revision asked for.
fn serve_fixture(listener: TcpListener, requests: Arc<AtomicUsize>, revisions: Arc<Mutex<Vec<String>>>) {
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
        let prefix = format!("/{REPO}/resolve/");
        let target = path.strip_prefix(&prefix).and_then(|rest| rest.split_once('/'));
        if let Some((revision, _)) = target {
            revisions.lock().unwrap().push(revision.to_string());
        }
        let served = target.and_then(|(revision, file)| {
            let commit = match revision {
                "main" => COMMIT,
                "v1" => V1_COMMIT,
                _ => return None,
            };
            std::fs::read(fixture_dir().join(file))
                .ok()
                .map(|bytes| (commit, bytes))
        });
        let response = match served {
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            Some((commit, bytes)) => {
                let (start, end) = match range {
                    Some((a, b)) => (a, b.unwrap_or(bytes.len() - 1).min(bytes.len() - 1)),
                    None => (0, bytes.len() - 1),
                };
                let slice = &bytes[start..=end];
                let etag = format!("{:x}-{}", bytes.len(), path.len());
                let mut head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\
                     ETag: \"{etag}\"\r\nx-repo-commit: {commit}\r\nConnection: close\r\n\r\n",
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
    let _env = env_lock();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let revisions = Arc::new(Mutex::new(Vec::new()));
    let (counter, asked) = (requests.clone(), revisions.clone());
    std::thread::spawn(move || serve_fixture(listener, counter, asked));

    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::remove_var("HF_HUB_OFFLINE");

    let files = ModelSource::parse(REPO)
        .unwrap()
        .resolve()
        .expect("download from the local hub");
    assert!(files.config.starts_with(home.path().join("hub")), "{:?}", files.config);
    assert_eq!(files.weights.len(), 2, "both shards listed in the index");
    let downloaded = Embedder::load(&files, DType::F32, &Device::Cpu).unwrap();
    let reference =
        Embedder::load(&ModelSource::Dir(fixture_dir()).resolve().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let a = downloaded
        .embed(PASSAGE_INSTRUCTION, &["hello"], &EmbedOptions::default())
        .unwrap();
    let b = reference
        .embed(PASSAGE_INSTRUCTION, &["hello"], &EmbedOptions::default())
        .unwrap();
    assert_eq!(a, b);
    assert!(requests.load(Ordering::SeqCst) >= 5);

    // Offline: served from the cache without a single request.
    let before = requests.load(Ordering::SeqCst);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let cached = ModelSource::parse(REPO).unwrap().resolve().expect("offline from cache");
    assert_eq!(cached, files);
    assert_eq!(requests.load(Ordering::SeqCst), before);

    // Offline and not cached: a clear error naming the repo and the setting.
    let err = ModelSource::parse("nvidia-test/not-cached")
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("nvidia-test/not-cached") && err.contains("HF_HUB_OFFLINE"), "{err}");

    // Online, unknown repo: the server's 404 is reported with the file name.
    std::env::remove_var("HF_HUB_OFFLINE");
    let err = ModelSource::parse("nvidia-test/absent")
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("nvidia-test/absent") && err.contains("config.json"), "{err}");
    assert!(revisions.lock().unwrap().iter().all(|r| r == "main"), "{:?}", revisions.lock().unwrap());

    // Online, pinned to the tag v1: fetched from /resolve/v1/ into the snapshot of v1's commit,
    // with refs/v1 recorded next to the untouched refs/main.
    let repo_dir = home.path().join("hub/models--nvidia-test--nv-embed-tiny");
    revisions.lock().unwrap().clear();
    let pinned = ModelSource::parse(&format!("{REPO}@v1"))
        .unwrap()
        .resolve()
        .expect("download v1");
    let v1_snapshot = repo_dir.join("snapshots").join(V1_COMMIT);
    assert_eq!(pinned.config, v1_snapshot.join("config.json"));
    assert_eq!(pinned.tokenizer, v1_snapshot.join("tokenizer.json"));
    assert_eq!(pinned.weights.len(), 2);
    assert!(pinned.weights.iter().all(|w| w.starts_with(&v1_snapshot)), "{:?}", pinned.weights);
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/v1")).unwrap(), V1_COMMIT);
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    let asked = revisions.lock().unwrap().clone();
    assert!(!asked.is_empty() && asked.iter().all(|r| r == "v1"), "{asked:?}");
    assert_eq!(std::fs::read(&pinned.weights[1]).unwrap(), std::fs::read(&files.weights[1]).unwrap());

    // ... and offline the same pin is served from that snapshot without a request.
    let before = requests.load(Ordering::SeqCst);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(ModelSource::parse(&format!("{REPO}@v1")).unwrap().resolve().unwrap(), pinned);
    assert_eq!(ModelSource::parse(REPO).unwrap().resolve().unwrap(), files);
    assert_eq!(requests.load(Ordering::SeqCst), before);

    // Online, a revision the server does not know: the error names the repo with its revision.
    std::env::remove_var("HF_HUB_OFFLINE");
    match ModelSource::parse(&format!("{REPO}@v2")).unwrap().resolve() {
        Err(Error::Hub { repo, file, .. }) => {
            assert_eq!(repo, format!("{REPO}@v2"));
            assert_eq!(file, "config.json");
        }
        other => panic!("expected a hub error, got {other:?}"),
    }
}

const MAIN_SHA: &str = "1111111111111111111111111111111111111111";
const V1_SHA: &str = "2222222222222222222222222222222222222222";
/// A commit kept in the cache with no ref pointing at it, as `huggingface_hub` leaves a download
/// pinned to a commit sha.
const OLD_SHA: &str = "3333333333333333333333333333333333333333";

fn write(path: &Path, contents: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

/// Lays out `snapshots/<sha>/` of `repo_dir`: sharded (an index and two shards) or one file.
/// Returns the files a resolution of that snapshot must give.
fn snapshot(repo_dir: &Path, sha: &str, sharded: bool) -> ModelFiles {
    let dir = repo_dir.join("snapshots").join(sha);
    write(&dir.join("config.json"), &format!("{{\"commit\": \"{sha}\"}}"));
    write(&dir.join("tokenizer.json"), "{}");
    let weights: Vec<PathBuf> = if sharded {
        let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
        write(
            &dir.join("model.safetensors.index.json"),
            &format!(r#"{{"weight_map": {{"a.weight": "{}", "b.weight": "{}"}}}}"#, names[0], names[1]),
        );
        names.iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for w in &weights {
        write(w, sha);
    }
    ModelFiles {
        config: dir.join("config.json"),
        tokenizer: dir.join("tokenizer.json"),
        weights,
    }
}

/// A cache for `org/name` with refs/main -> MAIN_SHA (one weights file), refs/v1 -> V1_SHA
/// (sharded) and an unreferenced OLD_SHA snapshot (one weights file), offline.
struct PinnedCache {
    home: tempfile::TempDir,
    main: ModelFiles,
    v1: ModelFiles,
    old: ModelFiles,
}

fn pinned_cache() -> PinnedCache {
    let home = tempfile::tempdir().unwrap();
    let repo_dir = home.path().join("hub/models--org--name");
    let main = snapshot(&repo_dir, MAIN_SHA, false);
    let v1 = snapshot(&repo_dir, V1_SHA, true);
    let old = snapshot(&repo_dir, OLD_SHA, false);
    write(&repo_dir.join("refs/main"), MAIN_SHA);
    write(&repo_dir.join("refs/v1"), V1_SHA);
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::remove_var("HF_ENDPOINT");
    PinnedCache { home, main, v1, old }
}

fn resolve(spec: &str) -> nvembed_engine::Result<ModelFiles> {
    ModelSource::parse(spec)?.resolve()
}

#[test]
fn parse_splits_repo_and_revision() {
    let _env = env_lock();
    let hub = |repo: &str, revision: Option<&str>| ModelSource::Hub {
        repo: repo.to_string(),
        revision: revision.map(str::to_string),
    };
    assert_eq!(ModelSource::parse("nvidia/NV-Embed-v2@v1").unwrap(), hub("nvidia/NV-Embed-v2", Some("v1")));
    assert_eq!(ModelSource::parse("nvidia/NV-Embed-v2").unwrap(), hub("nvidia/NV-Embed-v2", None));
    assert_eq!(ModelSource::parse("gpt2@main").unwrap(), hub("gpt2", Some("main")));
    assert_eq!(ModelSource::parse(&format!("org/name@{OLD_SHA}")).unwrap(), hub("org/name", Some(OLD_SHA)));
    assert_eq!(ModelSource::parse("org/name@refs/pr/1").unwrap(), hub("org/name", Some("refs/pr/1")));
    assert_eq!("org/name@v1".parse::<ModelSource>().unwrap(), hub("org/name", Some("v1")));
    assert_eq!(ModelSource::hub("org/name"), hub("org/name", None));

    // Paths keep the directory rules, '@' or not.
    for spec in ["/models/nv-embed@v1", "./nv-embed@v1", "../a@b", "models/nv/embed@v1"] {
        assert_eq!(ModelSource::parse(spec).unwrap(), ModelSource::Dir(PathBuf::from(spec)), "{spec}");
    }
    // An existing relative path is a directory even when it reads like `name@rev` or `org/name@rev`.
    let cwd = std::env::current_dir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(scratch.path().join("local@v1")).unwrap();
    std::fs::create_dir_all(scratch.path().join("org/name@v1")).unwrap();
    std::env::set_current_dir(scratch.path()).unwrap();
    let local = ModelSource::parse("local@v1");
    let nested = ModelSource::parse("org/name@v1");
    let absent = ModelSource::parse("org/other@v1");
    std::env::set_current_dir(&cwd).unwrap();
    assert_eq!(local.unwrap(), ModelSource::Dir(PathBuf::from("local@v1")));
    assert_eq!(nested.unwrap(), ModelSource::Dir(PathBuf::from("org/name@v1")));
    assert_eq!(absent.unwrap(), hub("org/other", Some("v1")));
}

#[test]
fn offline_revision_follows_its_ref() {
    let _env = env_lock();
    let cache = pinned_cache();
    let v1_snapshot = cache.home.path().join("hub/models--org--name/snapshots").join(V1_SHA);

    let pinned = resolve("org/name@v1").expect("v1 is cached");
    assert_eq!(pinned, cache.v1);
    assert_eq!(pinned.weights.len(), 2, "v1's snapshot is sharded");
    assert!(pinned.weights.iter().all(|w| w.starts_with(&v1_snapshot)), "{:?}", pinned.weights);
    assert_eq!(std::fs::read_to_string(&pinned.weights[0]).unwrap(), V1_SHA);

    // No revision and an explicit main both follow refs/main to the other snapshot.
    assert_eq!(resolve("org/name").unwrap(), cache.main);
    assert_eq!(resolve("org/name@main").unwrap(), cache.main);
    assert_ne!(cache.main.config, cache.v1.config);

    // A revision with no ref and no snapshot: the error names repo@revision and the setting.
    match resolve("org/name@v2") {
        Err(err @ Error::Hub { .. }) => {
            let Error::Hub { repo, file, reason } = &err else {
                unreachable!()
            };
            assert_eq!(repo, "org/name@v2");
            assert_eq!(file, "config.json");
            assert!(reason.contains("HF_HUB_OFFLINE"), "{reason}");
            assert!(err.to_string().contains("org/name@v2"), "{err}");
        }
        other => panic!("expected a hub error, got {other:?}"),
    }
}

#[test]
fn commit_sha_revision_resolves_to_its_snapshot() {
    let _env = env_lock();
    let cache = pinned_cache();
    let snapshots = cache.home.path().join("hub/models--org--name/snapshots");
    assert!(!cache
        .home
        .path()
        .join("hub/models--org--name/refs")
        .join(OLD_SHA)
        .exists());

    // No refs/<sha> file: found at snapshots/<sha> directly.
    let old = resolve(&format!("org/name@{OLD_SHA}")).expect("the old commit is cached");
    assert_eq!(old, cache.old);
    assert_eq!(old.config, snapshots.join(OLD_SHA).join("config.json"));
    assert_eq!(old.weights, vec![snapshots.join(OLD_SHA).join("model.safetensors")]);
    assert_eq!(std::fs::read_to_string(&old.config).unwrap(), format!("{{\"commit\": \"{OLD_SHA}\"}}"));

    // The sha a branch points at gives that branch's snapshot.
    assert_eq!(resolve(&format!("org/name@{V1_SHA}")).unwrap(), cache.v1);

    // Online, a cached commit is served without asking the endpoint (nothing listens there).
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::remove_var("HF_HUB_OFFLINE");
    assert_eq!(resolve(&format!("org/name@{OLD_SHA}")).unwrap(), cache.old);
    std::env::set_var("HF_HUB_OFFLINE", "1");

    // A sha with no snapshot is not cached.
    let missing = "4444444444444444444444444444444444444444";
    let err = resolve(&format!("org/name@{missing}")).unwrap_err().to_string();
    assert!(err.contains(&format!("org/name@{missing}")) && err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn malformed_hub_ids_are_invalid_arguments() {
    let _env = env_lock();
    let cases = [
        ("nvidia/NV-Embed-v2@", "empty revision"),
        ("org/name@v1@v2", "more than one '@'"),
        ("org/name@@v1", "more than one '@'"),
        ("@v1", "empty repo id"),
        ("@", "empty repo id"),
        ("", "empty repo id"),
        ("org/@v1", "empty segment in the repo id"),
        ("org/name@../../etc", "'..' path segment"),
        ("org/name@refs//pr", "empty, '.' or '..' path segment"),
        ("org/name@v 1", "whitespace"),
    ];
    for (spec, why) in cases {
        match ModelSource::parse(spec) {
            Err(Error::InvalidArgument(message)) => {
                assert!(message.contains(&format!("{spec:?}")), "{spec}: {message}");
                assert!(message.contains(why), "{spec}: {message}");
            }
            other => panic!("{spec}: expected InvalidArgument, got {other:?}"),
        }
        assert!(spec.parse::<ModelSource>().is_err(), "{spec}");
    }
    let message = ModelSource::parse("nvidia/NV-Embed-v2@").unwrap_err().to_string();
    assert_eq!(
        message,
        "invalid argument: invalid hub model id \"nvidia/NV-Embed-v2@\": empty revision after '@' \
         (expected org/name or org/name@<branch, tag or commit sha>)"
    );
}
