//! The one model of this server: named by its command line (the server-wide `nvembed.model`,
//! `nvembed.dtype`, `nvembed.device`), loaded by the first call that needs it or at start. A
//! failed load is reported to every call that waited for it; the next call tries again.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use nvembed_engine::{choose_dtype, Device, Embedder, Error, ModelSource};
use nvembed_protocol::Served;

/// What the server was started to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSettings {
    /// Directory or hub id (`org/name` or `org/name@revision`).
    pub model: String,
    /// The name clients know the model by (HTTP's `model`, the handshake's `Served`).
    pub served_model_name: String,
    pub dtype: String,
    pub device: String,
}

enum State {
    Empty,
    Loading,
    Ready(Arc<Embedder>),
}

pub struct ModelSlot {
    settings: ModelSettings,
    state: Mutex<(State, FailedLoads)>,
    changed: Condvar,
    /// The loaded checkpoint's fingerprint (`ModelFiles::fingerprint`), set with the model.
    revision: OnceLock<String>,
}

/// How many loads failed so far, and the last failure's message.
#[derive(Default)]
struct FailedLoads {
    count: u64,
    last: String,
}

/// How often a call waiting for another call's load checks whether its client is still there.
const LOAD_WAIT_POLL: Duration = Duration::from_millis(50);

fn device(name: &str) -> nvembed_engine::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(Error::from),
        other => Err(Error::InvalidArgument(format!(
            "unknown device {other:?} (expected one of {})",
            nvembed_protocol::DEVICE_NAMES.join(", ")
        ))),
    }
}

fn load(settings: &ModelSettings) -> nvembed_engine::Result<(Embedder, String)> {
    let files = ModelSource::parse(&settings.model)?.resolve()?;
    let model = Embedder::load(&files, choose_dtype(&settings.dtype, &files)?, &device(&settings.device)?)?;
    Ok((model, files.fingerprint()?))
}

impl ModelSlot {
    pub fn new(settings: ModelSettings) -> Self {
        Self {
            settings,
            state: Mutex::new((State::Empty, FailedLoads::default())),
            changed: Condvar::new(),
            revision: OnceLock::new(),
        }
    }

    /// What this server serves, once the model is loaded.
    pub fn served(&self) -> Option<Served> {
        let model = self.loaded()?;
        Some(Served {
            model: self.settings.served_model_name.clone(),
            revision: self.revision.get()?.clone(),
            dtype: model.dtype_name(),
            device: self.settings.device.clone(),
            dimension: model.embedding_dim(),
        })
    }

    /// The loaded checkpoint's fingerprint.
    pub fn revision(&self) -> Option<String> {
        self.revision.get().cloned()
    }

    pub fn settings(&self) -> &ModelSettings {
        &self.settings
    }

    /// The loaded model, if it is loaded; never waits.
    pub fn loaded(&self) -> Option<Arc<Embedder>> {
        match &self.state.lock().unwrap_or_else(|p| p.into_inner()).0 {
            State::Ready(model) => Some(model.clone()),
            _ => None,
        }
    }

    /// For health checks: Ok(whether the model is loaded), or the error of the last load when
    /// it failed and no load has succeeded since.
    pub fn health(&self) -> Result<bool, String> {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &guard.0 {
            State::Ready(_) => Ok(true),
            State::Empty if guard.1.count > 0 => Err(guard.1.last.clone()),
            State::Empty | State::Loading => Ok(false),
        }
    }

    /// The model, loading it in this thread if nobody has. Ok(None) when `gave_up` said so while
    /// another thread was loading; Err with the load error otherwise.
    pub fn get(&self, gave_up: impl Fn() -> bool) -> Result<Option<Arc<Embedder>>, String> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let failures_seen = guard.1.count;
        loop {
            match &guard.0 {
                State::Ready(model) => return Ok(Some(model.clone())),
                State::Empty if guard.1.count > failures_seen => return Err(guard.1.last.clone()),
                State::Empty => {
                    guard.0 = State::Loading;
                    drop(guard);
                    let loaded = load(&self.settings);
                    let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    let result = match loaded {
                        Ok((model, revision)) => {
                            let _ = self.revision.set(revision);
                            // One line in the server log: which dtype `auto` chose and which
                            // kernels the CPU got (or that candle's matmul runs).
                            eprintln!(
                                "nvembed-model-server: loaded {:?} ({}) in {:.1} s ({}, projections: {})",
                                self.settings.model,
                                self.revision.get().map_or("", String::as_str),
                                model.load_seconds(),
                                model.dtype_name(),
                                model.matmul()
                            );
                            let model = Arc::new(model);
                            guard.0 = State::Ready(model.clone());
                            Ok(Some(model))
                        }
                        Err(e) => {
                            guard.0 = State::Empty;
                            guard.1.count += 1;
                            guard.1.last = e.to_string();
                            eprintln!("nvembed-model-server: cannot load model {:?}: {e}", self.settings.model);
                            Err(e.to_string())
                        }
                    };
                    self.changed.notify_all();
                    return result;
                }
                State::Loading => {
                    if gave_up() {
                        return Ok(None);
                    }
                    guard = self
                        .changed
                        .wait_timeout(guard, LOAD_WAIT_POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}
