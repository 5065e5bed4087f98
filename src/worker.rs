//! The background worker: a small supervisor that keeps the model server process running.
//!
//! The model runs in a separate executable, not in a Postgres process: if it crashes or is
//! OOM-killed, only it dies (a background worker dying by a signal would make the postmaster
//! restart every session). The supervisor notices within a poll interval and starts it again.

use std::ffi::CStr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use nvembed_protocol::SOCKET_NAME;

/// File name of the model server executable, installed beside nvembed.so.
pub const SERVER_EXECUTABLE: &str = "nvembed-model-server";
/// How often the supervisor checks that the model server is alive.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

pub fn register() {
    BackgroundWorkerBuilder::new("nvembed model supervisor")
        .set_type("nvembed")
        .set_library("nvembed")
        .set_function("nvembed_worker_main")
        .enable_shmem_access(None)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

fn server_path() -> PathBuf {
    // SAFETY: pkglib_path is a NUL-terminated path set once at postmaster start.
    let pkglib = unsafe { CStr::from_ptr(std::ptr::addr_of!(pg_sys::pkglib_path).cast()) };
    PathBuf::from(pkglib.to_string_lossy().into_owned()).join(SERVER_EXECUTABLE)
}

fn spawn(restarts: u64) -> std::io::Result<Child> {
    let mut command = Command::new(server_path());
    command.args(["serve", "--socket", SOCKET_NAME, "--restarts", &restarts.to_string()]);
    let (threads, batch_tokens) = crate::gucs::server_settings();
    if threads > 0 {
        command.args(["--threads", &threads.to_string()]);
    }
    command.args(["--batch-tokens", &batch_tokens.to_string()]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // Die with the supervisor, so no model process outlives the server.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
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

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nvembed_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let mut child: Option<Child> = None;
    // Every start after the first is a restart.
    let mut starts: u64 = 0;
    let mut settings = crate::gucs::server_settings();
    while BackgroundWorker::wait_latch(Some(POLL_INTERVAL)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading postgresql.conf is what a worker does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if crate::gucs::server_settings() != settings {
                settings = crate::gucs::server_settings();
                log!("nvembed: nvembed.threads or nvembed.max_batch_tokens changed, restarting the model server");
                stop(&mut child);
            }
        }
        if let Some(c) = child.as_mut() {
            match c.try_wait() {
                Ok(Some(status)) => {
                    warning!("nvembed: model server exited ({status}); restarting it");
                    child = None;
                }
                Ok(None) => continue,
                Err(e) => warning!("nvembed: cannot check the model server: {e}"),
            }
        }
        if child.is_none() {
            match spawn(starts) {
                Ok(c) => child = Some(c),
                Err(e) => warning!("nvembed: cannot start {}: {e}", server_path().display()),
            }
            starts += 1;
        }
    }
    stop(&mut child);
    let _ = std::fs::remove_file(SOCKET_NAME);
}
