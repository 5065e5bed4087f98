//! What the server's integration tests share: the tiny fixture and a server of it, in-process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvembed_server::connection::Server;
use nvembed_server::limits::Limits;
use nvembed_server::model::{ModelSettings, ModelSlot};
use nvembed_server::scheduler::Scheduler;
use nvembed_server::stats::Stats;

/// The model name the fixture's server announces.
pub const SERVED_NAME: &str = "nvembed-tiny-a";

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/nvembed-tiny-a")
}

/// A self-signed certificate for localhost and its key, written into `dir` as PEM files, and
/// a root store that trusts it.
#[allow(dead_code)] // the TLS tests use it, the others share this module
pub fn localhost_certificate(dir: &Path) -> (PathBuf, PathBuf, rustls::RootCertStore) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    (cert, key, roots)
}

/// A server of the fixture (f32, CPU) with its scheduler running, and no listener yet.
#[allow(dead_code)] // every test binary but one uses it
pub fn tiny_server(limits: Limits) -> Arc<Server> {
    server_of(&fixture(), limits)
}

/// As `tiny_server`, of the checkpoint in `model` (which need not load).
pub fn server_of(model: &Path, limits: Limits) -> Arc<Server> {
    let stats = Arc::new(Stats::default());
    let server = Arc::new(Server::new(
        ModelSlot::new(ModelSettings {
            model: model.to_string_lossy().into_owned(),
            served_model_name: SERVED_NAME.into(),
            dtype: "f32".into(),
            device: "cpu".into(),
        }),
        Scheduler::new(16_384, stats.clone()),
        stats,
        0,
        limits,
    ));
    let scheduler = server.scheduler.clone();
    std::thread::spawn(move || scheduler.run());
    server
}
