//! The background worker: a small supervisor that keeps the model server process running.
//!
//! The model runs in a separate executable, not in a Postgres process: if it crashes or is
//! OOM-killed, only it dies (a background worker dying by a signal would make the postmaster
//! restart every session). The supervisor starts it with the server-wide settings, restarts it
//! when it exits (with exponential backoff, so a server that cannot start does not spin), when
//! a reload changes its settings, and when it stops answering (a liveness check): a wedged
//! server is killed and started again. Each change of state is logged once. With
//! nvembed.servers set, the cluster uses remote servers and none runs here. It also keeps the
//! vectorizer workers of nvembed.vectorizer_databases running (`vectorizer.rs`).

use std::ffi::CStr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

use nvembed_protocol::{SERVER_EXECUTABLE, SOCKET_NAME};

use crate::gucs::ServerSettings;

/// How often the supervisor checks that the model server process exists.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Delay before the first restart after an exit; it doubles with each exit in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A server that ran this long before exiting is restarted after FIRST_BACKOFF again.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// How often a running server is asked for its status, how long it may take to answer, and
/// how many checks in a row it may miss before it is taken for wedged.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(5);
const LIVENESS_MISSES: u32 = 3;

pub fn register() {
    BackgroundWorkerBuilder::new("nvembed model supervisor")
        .set_type("nvembed")
        .set_library("nvembed")
        .set_function("nvembed_worker_main")
        // Connected to no database: it reads the shared catalog pg_database, to start the
        // vectorizer workers only of databases that exist.
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

fn server_path() -> PathBuf {
    // SAFETY: pkglib_path is a NUL-terminated path set once at postmaster start.
    let pkglib = unsafe { CStr::from_ptr(std::ptr::addr_of!(pg_sys::pkglib_path).cast()) };
    PathBuf::from(pkglib.to_string_lossy().into_owned()).join(SERVER_EXECUTABLE)
}

fn spawn(settings: &ServerSettings, restarts: u64) -> std::io::Result<Child> {
    let mut command = Command::new(server_path());
    command.args([
        "--socket",
        SOCKET_NAME,
        "--model",
        &settings.model,
        "--dtype",
        &settings.dtype,
    ]);
    command.args([
        "--device",
        &settings.device,
        "--batch-tokens",
        &settings.batch_tokens.to_string(),
    ]);
    command.args(["--restarts", &restarts.to_string()]);
    if settings.threads > 0 {
        command.args(["--threads", &settings.threads.to_string()]);
    }
    if settings.preload {
        command.arg("--preload");
    }
    let supervisor = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Die with the supervisor, so no model process outlives the server.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl: then no signal will come.
            if libc::getppid() != supervisor {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command.spawn()
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let _ = c.wait();
    }
}

/// Whether the server is alive: it answers a status request within LIVENESS_TIMEOUT, or it
/// refuses the connection at once (a server at its connection limit refuses new connections
/// unread: it is busy, not wedged, and killing it would fail every call it serves).
fn answers() -> bool {
    match crate::client::query_status(LIVENESS_TIMEOUT) {
        Ok(_) => true,
        // Silence, or nobody listening, is a miss; any answer (a refusal, a closed connection)
        // comes from a server that is alive.
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::NotFound
                | std::io::ErrorKind::ConnectionRefused
        ),
    }
}

/// The supervisor's view of the model server.
struct Supervised {
    child: Option<Child>,
    started: Instant,
    starts: u64,
    backoff: Duration,
    next_start: Instant,
    /// The last reason the executable could not be started, logged once.
    spawn_error: Option<String>,
    next_check: Instant,
    misses: u32,
}

impl Supervised {
    fn start(&mut self, settings: &ServerSettings) {
        match spawn(settings, self.starts) {
            Ok(c) => {
                log!("nvembed: model server started (pid {}, model {})", c.id(), settings.model);
                self.child = Some(c);
                self.started = Instant::now();
                self.starts += 1;
                self.spawn_error = None;
                self.next_check = Instant::now() + LIVENESS_INTERVAL;
                self.misses = 0;
            }
            Err(e) => {
                let reason = if e.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        "the model server executable {} is missing; install nvembed completely (make install, or the package)",
                        server_path().display()
                    )
                } else {
                    format!("cannot start {}: {e}", server_path().display())
                };
                if self.spawn_error.as_ref() != Some(&reason) {
                    warning!("nvembed: {reason}; retrying with backoff");
                    self.spawn_error = Some(reason);
                }
                self.schedule_restart();
            }
        }
    }

    fn schedule_restart(&mut self) {
        self.next_start = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn exited(&mut self, status: std::process::ExitStatus) {
        if self.started.elapsed() >= STABLE_RUN {
            self.backoff = FIRST_BACKOFF;
        }
        warning!("nvembed: model server exited ({status}); restarting it in {:.1} s", self.backoff.as_secs_f64());
        self.child = None;
        self.schedule_restart();
    }

    /// Asks a running server for its status now and then; kills it after LIVENESS_MISSES
    /// unanswered checks in a row.
    fn check_liveness(&mut self) {
        if self.child.is_none() || Instant::now() < self.next_check {
            return;
        }
        self.next_check = Instant::now() + LIVENESS_INTERVAL;
        if answers() {
            self.misses = 0;
            return;
        }
        self.misses += 1;
        if self.misses >= LIVENESS_MISSES {
            let pid = self.child.as_ref().map_or(0, |c| c.id());
            warning!(
                "nvembed: model server (pid {pid}) did not answer {LIVENESS_MISSES} status checks in a row; killing it"
            );
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
            }
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nvembed_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut settings = crate::gucs::server_settings();
    let mut server = Supervised {
        child: None,
        started: Instant::now(),
        starts: 0,
        backoff: FIRST_BACKOFF,
        next_start: Instant::now(),
        spawn_error: None,
        next_check: Instant::now(),
        misses: 0,
    };
    let mut vectorizers = crate::vectorizer::Workers::default();
    vectorizers.configure(&crate::gucs::vectorizer_databases());
    // With nvembed.servers set, the cluster's calls go there: no model here.
    let mut local = crate::endpoints::remotes().is_empty();
    if !local {
        log!("nvembed: no local model server: calls go to nvembed.servers ({})", crate::gucs::servers());
    }
    while BackgroundWorker::wait_latch(Some(POLL_INTERVAL)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading postgresql.conf is what a worker does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            vectorizers.configure(&crate::gucs::vectorizer_databases());
            let now_local = crate::endpoints::remotes().is_empty();
            if now_local != local {
                local = now_local;
                if local {
                    log!("nvembed: nvembed.servers is empty now: starting the local model server");
                    server.backoff = FIRST_BACKOFF;
                    server.next_start = Instant::now();
                } else {
                    log!("nvembed: calls go to nvembed.servers ({}) now: stopping the local model server", crate::gucs::servers());
                    stop(&mut server.child);
                    let _ = std::fs::remove_file(SOCKET_NAME);
                }
            }
            let changed = crate::gucs::server_settings();
            if changed != settings {
                settings = changed;
                if local {
                    log!("nvembed: model server settings changed; restarting it with model {}", settings.model);
                    stop(&mut server.child);
                    server.backoff = FIRST_BACKOFF;
                    server.next_start = Instant::now();
                }
            }
        }
        if let Some(c) = server.child.as_mut() {
            match c.try_wait() {
                Ok(Some(status)) => server.exited(status),
                Ok(None) => server.check_liveness(),
                Err(e) => warning!("nvembed: cannot check the model server: {e}"),
            }
        }
        if local && server.child.is_none() && Instant::now() >= server.next_start {
            server.start(&settings);
        }
        vectorizers.tick();
    }
    stop(&mut server.child);
    let _ = std::fs::remove_file(SOCKET_NAME);
}
