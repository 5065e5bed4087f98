//! Why a call to a model server failed, as the caller sees it (an ERROR with a SQLSTATE and a
//! hint) and whose fault it is (what a vectorizer worker does about it); and the waiting that
//! every call does, which never blocks query cancel or statement_timeout.

use std::io::ErrorKind as IoErrorKind;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR with a SQLSTATE and a hint.
pub fn fail(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, "nvembed")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Why a call failed: what the caller sees as an ERROR. The vectorizer workers handle it
/// themselves instead, by whose fault it is.
#[derive(Debug, Clone)]
pub struct CallError {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub hint: &'static str,
    pub blame: Blame,
}

/// Whose fault a failed call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The texts, or what was asked of them (instruction, length): retrying them as they are
    /// cannot succeed.
    Text,
    /// The connection was lost during the call: the server exited, maybe because of a text.
    Connection,
    /// The model server or the configuration: no call can succeed until it is fixed.
    Server,
}

impl CallError {
    pub fn new(code: PgSqlErrorCode, message: String, hint: &'static str) -> Self {
        Self::blaming(Blame::Server, code, message, hint)
    }

    pub fn blaming(blame: Blame, code: PgSqlErrorCode, message: String, hint: &'static str) -> Self {
        Self {
            code,
            message,
            hint,
            blame,
        }
    }

    pub fn raise(self) -> ! {
        fail(self.code, self.message, self.hint)
    }
}

pub type CallResult<T> = Result<T, CallError>;

pub fn lost(e: std::io::Error) -> CallError {
    CallError::blaming(
        Blame::Connection,
        PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
        format!("nvembed model server connection lost: {e}"),
        "The model server exited (crash, out of memory or a settings change) and is being restarted: retry the call. \
         See the server log.",
    )
}

/// Checks for query cancel and statement_timeout (which raise), and for a background worker's
/// shutdown request (a SIGTERM, which ends the call).
pub fn check_interrupts() -> CallResult<()> {
    pgrx::check_for_interrupts!();
    // SAFETY: a flag set by the background worker's SIGTERM handler; never set in a backend.
    if unsafe { std::ptr::addr_of!(pgrx::pg_sys::ShutdownRequestPending).read_volatile() } != 0 {
        return Err(CallError::new(
            PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
            "nvembed: the call was stopped: shutting down".into(),
            "",
        ));
    }
    Ok(())
}

/// The socket operation timed out or was interrupted: check for cancel and go on waiting.
pub fn still_waiting(e: &std::io::Error) -> bool {
    matches!(e.kind(), IoErrorKind::WouldBlock | IoErrorKind::TimedOut | IoErrorKind::Interrupted)
}

