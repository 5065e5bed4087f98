//! Backend side of the IPC: one request to the model server, waited for without ever blocking
//! query cancel or statement_timeout.

use std::cell::RefCell;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nvembed_protocol::{decode_frame, ErrorKind, ModelSpec, Request, Response, Status, SOCKET_NAME};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Set in `_PG_init` when loaded through shared_preload_libraries (inherited by backends).
pub static PRELOADED: AtomicBool = AtomicBool::new(false);

/// How often a waiting backend wakes to check for cancel / statement_timeout.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long to wait for the model server's socket while the supervisor (re)starts it.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Raises an ERROR with a SQLSTATE and a hint.
pub fn fail(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, "nvembed").set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

fn require_preload() {
    if !PRELOADED.load(Ordering::Relaxed) {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "nvembed is not loaded through shared_preload_libraries".into(),
            "Add shared_preload_libraries = 'nvembed' to postgresql.conf and restart PostgreSQL.",
        );
    }
}

/// Connects, waiting up to CONNECT_WAIT while the supervisor (re)starts the server.
fn connect() -> UnixStream {
    require_preload();
    let started = Instant::now();
    loop {
        match UnixStream::connect(SOCKET_NAME) {
            Ok(stream) => return stream,
            Err(_) if started.elapsed() < CONNECT_WAIT => {
                pgrx::check_for_interrupts!();
                std::thread::sleep(POLL_INTERVAL);
            }
            Err(e) => fail(
                PgSqlErrorCode::ERRCODE_CANNOT_CONNECT_NOW,
                format!("nvembed model server is not reachable: {e}"),
                "The nvembed background worker starts it; check the server log for its errors.",
            ),
        }
    }
}

/// The socket operation timed out or was interrupted: check for cancel and go on waiting.
fn still_waiting(e: &std::io::Error) -> bool {
    matches!(e.kind(), IoErrorKind::WouldBlock | IoErrorKind::TimedOut | IoErrorKind::Interrupted)
}

/// Sends `request` on `stream` and waits for the answer, checking for interrupts all along.
fn round_trip(mut stream: UnixStream, request: &Request) -> Response {
    let lost = |e: std::io::Error| -> ! {
        fail(
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            format!("nvembed model server connection lost: {e}"),
            "The model process exited (crash or out of memory); it is being restarted, retry the call.",
        )
    };
    stream.set_write_timeout(Some(POLL_INTERVAL)).unwrap_or_else(|e| lost(e));
    stream.set_read_timeout(Some(POLL_INTERVAL)).unwrap_or_else(|e| lost(e));
    let mut frame = Vec::new();
    nvembed_protocol::write_frame(&mut frame, request).unwrap_or_else(|e| lost(e));
    let mut sent = 0;
    while sent < frame.len() {
        match stream.write(&frame[sent..]) {
            Ok(0) => lost(IoErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if still_waiting(&e) => {
                pgrx::check_for_interrupts!();
            }
            Err(e) => lost(e),
        }
    }
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match decode_frame::<Response>(&received) {
            Ok(Some((response, _))) => return response,
            Ok(None) => {}
            Err(e) => lost(e),
        }
        match stream.read(&mut chunk) {
            Ok(0) => lost(IoErrorKind::UnexpectedEof.into()),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if still_waiting(&e) => {
                pgrx::check_for_interrupts!();
            }
            Err(e) => lost(e),
        }
    }
}

/// One-entry cache per backend: `ORDER BY embedding <#> nvembed_query('...')` may evaluate the
/// call once per row, and each would otherwise be a model round trip.
struct LastCall {
    key: (ModelSpec, String, Vec<String>, usize),
    vectors: Vec<Vec<f32>>,
}

thread_local! {
    static LAST_CALL: RefCell<Option<LastCall>> = const { RefCell::new(None) };
}

/// Embeds `texts` with `instruction` using the session's model settings.
pub fn embed(instruction: &str, texts: Vec<String>, max_length: usize) -> Vec<Vec<f32>> {
    let spec = crate::gucs::model_spec();
    let key = (spec.clone(), instruction.to_string(), texts.clone(), max_length);
    if let Some(vectors) = LAST_CALL.with(|c| c.borrow().as_ref().filter(|l| l.key == key).map(|l| l.vectors.clone())) {
        return vectors;
    }
    let request = Request::Embed {
        spec: spec.clone(),
        instruction: instruction.to_string(),
        texts,
        max_length,
    };
    match round_trip(connect(), &request) {
        Response::Embeddings(vectors) => {
            LAST_CALL.with(|c| {
                *c.borrow_mut() = Some(LastCall {
                    key,
                    vectors: vectors.clone(),
                })
            });
            vectors
        }
        Response::Error {
            kind: ErrorKind::Load,
            message,
        } => fail(
            PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            format!("nvembed could not load model \"{}\": {message}", spec.model),
            "Check nvembed.model (a checkpoint directory readable by the server's OS user, or a hub id) and nvembed.dtype.",
        ),
        Response::Error {
            kind: ErrorKind::InvalidInput,
            message,
        } => fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("nvembed: {message}"),
            "Shorten the instruction or raise nvembed.max_length.",
        ),
        Response::Error { message, .. } => fail(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("nvembed model server error: {message}"),
            "See the server log.",
        ),
        Response::Status(_) => fail(
            PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            "nvembed model server answered a status to an embedding request".into(),
            "",
        ),
    }
}

/// The model server's status, or None when it is not running.
pub fn status() -> Option<Status> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    // No waiting for a server that is not there: status reports that instead.
    let stream = UnixStream::connect(SOCKET_NAME).ok()?;
    match round_trip(stream, &Request::Status) {
        Response::Status(status) => Some(status),
        _ => None,
    }
}
