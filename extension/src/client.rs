//! Backend side of the IPC: one connection per call to the model server, waited on without ever
//! blocking query cancel or statement_timeout. Leaving a call (an ERROR, a cancel, a LIMIT that
//! stops reading rows) closes its connection, which is how the server learns to stop computing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nvembed_protocol::{
    decode_frame, text_chunks, ClientMessage, EmbedHeader, ErrorKind, Identity, ServerMessage, Status, WorkClass,
    BUILD_ID, MAX_INSTRUCTION_BYTES, MAX_TEXT_BYTES, SOCKET_NAME,
};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{pg_sys, PgLogLevel, PgSqlErrorCode};

use crate::gucs;

/// Set in `_PG_init` when loaded through shared_preload_libraries (inherited by backends).
pub static PRELOADED: AtomicBool = AtomicBool::new(false);

/// How often a waiting backend wakes to check for cancel / statement_timeout.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long to wait for the model server's socket while the supervisor (re)starts it.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Raises an ERROR with a SQLSTATE and a hint.
pub fn fail(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, "nvembed")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Why a call failed: what the caller sees as an ERROR. The vectorizer workers handle it
/// themselves instead, by whose fault it is.
#[derive(Debug)]
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
    fn new(code: PgSqlErrorCode, message: String, hint: &'static str) -> Self {
        Self::blaming(Blame::Server, code, message, hint)
    }

    fn blaming(blame: Blame, code: PgSqlErrorCode, message: String, hint: &'static str) -> Self {
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

type CallResult<T> = Result<T, CallError>;

fn lost(e: std::io::Error) -> CallError {
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
fn check_interrupts() -> CallResult<()> {
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
fn still_waiting(e: &std::io::Error) -> bool {
    matches!(e.kind(), IoErrorKind::WouldBlock | IoErrorKind::TimedOut | IoErrorKind::Interrupted)
}

/// A connection to the model server that passed the build handshake.
struct Connection {
    stream: UnixStream,
    received: Vec<u8>,
    start: usize,
}

impl Connection {
    /// Connects, waiting up to CONNECT_WAIT while the supervisor (re)starts the server.
    fn open() -> CallResult<Self> {
        if !PRELOADED.load(Ordering::Relaxed) {
            return Err(CallError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "nvembed is not loaded through shared_preload_libraries".into(),
                "Add shared_preload_libraries = 'nvembed' to postgresql.conf and restart PostgreSQL.",
            ));
        }
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(SOCKET_NAME) {
                Ok(stream) => break stream,
                Err(_) if started.elapsed() < CONNECT_WAIT => {
                    check_interrupts()?;
                    std::thread::sleep(POLL_INTERVAL);
                }
                // This backend, not the server, is out of descriptors (each open cursor over a
                // batch function holds one).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    return Err(CallError::new(
                        PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
                        format!("nvembed: this session cannot open another model server connection: {e}"),
                        "Close cursors over nvembed_passages / nvembed_queries that are no longer read: each holds one \
                         connection (and one open file of this session).",
                    ))
                }
                // Not 57P03 ("the database system is starting up"): poolers and drivers take that
                // to mean the whole database, and reconnect or wait.
                Err(e) => {
                    return Err(CallError::new(
                        PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                        format!("nvembed model server is not reachable: {e}"),
                        "The nvembed background worker starts it; see the server log for why it is not running.",
                    ))
                }
            }
        };
        stream.set_write_timeout(Some(POLL_INTERVAL)).map_err(lost)?;
        stream.set_read_timeout(Some(POLL_INTERVAL)).map_err(lost)?;
        let mut connection = Self {
            stream,
            received: Vec::new(),
            start: 0,
        };
        connection.send(&ClientMessage::Hello { build: BUILD_ID.into() })?;
        connection.send(&ClientMessage::Identify(Identity {
            role: session_role(),
            role_connections: gucs::max_calls_per_role(),
        }))?;
        match connection.receive()? {
            ServerMessage::Hello { build } if build == BUILD_ID => {}
            ServerMessage::Hello { build } => return Err(different_builds(&build)),
            // A server at its connection limit says so in place of the handshake.
            ServerMessage::Error { kind, message } => return Err(call_failed(kind, message)),
            other => return Err(protocol_violation(&other)),
        }
        match connection.receive()? {
            ServerMessage::Ready => Ok(connection),
            ServerMessage::Error { kind, message } => Err(call_failed(kind, message)),
            other => Err(protocol_violation(&other)),
        }
    }

    fn send(&mut self, message: &ClientMessage) -> CallResult<()> {
        let mut frame = Vec::new();
        message.write(&mut frame).map_err(lost)?;
        let mut sent = 0;
        while sent < frame.len() {
            match self.stream.write(&frame[sent..]) {
                Ok(0) => return Err(lost(IoErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(e) if still_waiting(&e) => check_interrupts()?,
                Err(e) if matches!(e.kind(), IoErrorKind::BrokenPipe | IoErrorKind::ConnectionReset) => {
                    // The server may have refused the call before reading all of it, and closed
                    // the connection: its reason waits in the socket.
                    return Err(match self.receive() {
                        Ok(ServerMessage::Error { kind, message }) => call_failed(kind, message),
                        _ => lost(e),
                    });
                }
                Err(e) => return Err(lost(e)),
            }
        }
        Ok(())
    }

    fn receive(&mut self) -> CallResult<ServerMessage> {
        let mut chunk = vec![0u8; 256 << 10];
        loop {
            match decode_frame(&self.received[self.start..]) {
                Ok(Some((frame, used))) => {
                    self.start += used;
                    if self.start == self.received.len() {
                        self.received.clear();
                        self.start = 0;
                    }
                    return ServerMessage::decode(frame).map_err(lost);
                }
                Ok(None) => {}
                Err(e) => return Err(lost(e)),
            }
            if self.start > 0 {
                self.received.drain(..self.start);
                self.start = 0;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(lost(IoErrorKind::UnexpectedEof.into())),
                Ok(n) => self.received.extend_from_slice(&chunk[..n]),
                Err(e) if still_waiting(&e) => check_interrupts()?,
                Err(e) => return Err(lost(e)),
            }
        }
    }
}

fn different_builds(server_build: &str) -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
        format!("nvembed.so ({BUILD_ID}) and the model server ({server_build}) come from different builds"),
        "Reinstall nvembed so that both come from one build (make install, or the package), then restart PostgreSQL.",
    )
}

fn protocol_violation(message: &ServerMessage) -> CallError {
    let what = match message {
        ServerMessage::Hello { .. } => "a handshake",
        ServerMessage::Status(_) => "a status",
        ServerMessage::Ready => "an admission",
        ServerMessage::Vectors { .. } => "vectors",
        ServerMessage::Done => "the end of a call",
        ServerMessage::Error { .. } => "an error",
    };
    CallError::new(
        PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
        format!("nvembed model server sent {what} out of turn"),
        "See the server log.",
    )
}

/// The server's error for a call, as the caller sees it.
fn call_failed(kind: ErrorKind, message: String) -> CallError {
    match kind {
        ErrorKind::Load => CallError::new(
            PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            format!("nvembed could not load model \"{}\": {message}", gucs::model()),
            "Check nvembed.model (a checkpoint directory readable by the server's OS user, or a hub id) and nvembed.dtype \
             in postgresql.conf, then reload.",
        ),
        ErrorKind::InvalidInput => CallError::blaming(
            Blame::Text,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("nvembed: {message}"),
            "Shorten the instruction or raise nvembed.max_length.",
        ),
        ErrorKind::TooLarge => CallError::blaming(
            Blame::Text,
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("nvembed: {message}"),
            "Split the call into smaller batches, or raise nvembed.max_request_tokens in postgresql.conf.",
        ),
        ErrorKind::NonFinite => CallError::blaming(
            Blame::Text,
            PgSqlErrorCode::ERRCODE_FLOATING_POINT_EXCEPTION,
            format!("nvembed: {message}"),
            "A 16-bit dtype can overflow where f32 does not: try nvembed.dtype = 'f32'. See the server log.",
        ),
        ErrorKind::Internal => CallError::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("nvembed model server error: {message}"),
            "See the server log.",
        ),
        ErrorKind::Busy => CallError::new(
            PgSqlErrorCode::ERRCODE_TOO_MANY_CONNECTIONS,
            format!("nvembed: {message}"),
            "Close cursors over nvembed_passages / nvembed_queries that are no longer read, or retry later. A superuser \
             can give a role more with ALTER ROLE ... SET nvembed.max_calls_per_role.",
        ),
    }
}

thread_local! {
    static SESSION_ROLE: RefCell<Option<(pg_sys::Oid, String)>> = const { RefCell::new(None) };
}

/// Makes this process's calls count as `client` for the server's per-role connection limit
/// (a vectorizer worker is not the login role it connects as).
pub fn call_as(client: String) {
    // SAFETY: the session user is set once the worker has connected.
    let oid = unsafe { pg_sys::GetSessionUserId() };
    SESSION_ROLE.with(|r| *r.borrow_mut() = Some((oid, client)));
}

/// The session's login role, which the server's per-role connection limit counts. Read from the
/// catalog inside a transaction and remembered (a superuser's SET SESSION AUTHORIZATION changes
/// it): a vectorizer worker calls the model between transactions, where the catalog cannot be
/// read, so it looks its role up once at start.
pub fn session_role() -> String {
    // SAFETY: the session user is set once the backend or worker has connected.
    let oid = unsafe { pg_sys::GetSessionUserId() };
    if let Some(name) = SESSION_ROLE.with(|r| r.borrow().as_ref().filter(|(o, _)| *o == oid).map(|(_, n)| n.clone())) {
        return name;
    }
    // SAFETY: a syscache lookup, only inside a transaction.
    if !unsafe { pg_sys::IsTransactionState() } {
        return format!("role with OID {}", u32::from(oid));
    }
    // SAFETY: GetUserNameFromId returns a palloc'd copy of the existing role's name.
    let name = unsafe {
        std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(oid, false))
            .to_string_lossy()
            .into_owned()
    };
    SESSION_ROLE.with(|r| *r.borrow_mut() = Some((oid, name.clone())));
    name
}

/// Checks what the backend can check before sending anything.
fn check_limits(instruction: &str, max_length: usize, texts: &[String]) -> CallResult<()> {
    let limit = gucs::max_length_limit();
    if max_length > limit {
        return Err(CallError::blaming(
            Blame::Text,
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("nvembed.max_length ({max_length}) exceeds nvembed.max_length_limit ({limit})"),
            "Lower nvembed.max_length, or raise nvembed.max_length_limit in postgresql.conf.",
        ));
    }
    if instruction.len() > MAX_INSTRUCTION_BYTES {
        return Err(CallError::blaming(
            Blame::Text,
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "nvembed: an instruction of {} bytes is longer than the {MAX_INSTRUCTION_BYTES} bytes an instruction may have",
                instruction.len()
            ),
            "Shorten the instruction (nvembed.query_instruction or the task).",
        ));
    }
    if let Some(text) = texts.iter().find(|t| t.len() > MAX_TEXT_BYTES) {
        return Err(CallError::blaming(
            Blame::Text,
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "nvembed: a text of {} bytes is longer than the {} bytes one text may have",
                text.len(),
                MAX_TEXT_BYTES
            ),
            "Split the text; at most nvembed.max_length tokens of it are embedded anyway.",
        ));
    }
    Ok(())
}

/// The vectors of one call, read from the server as the caller asks for them.
pub struct VectorStream {
    connection: Connection,
    expected: usize,
    delivered: usize,
    ready: VecDeque<Vec<f32>>,
}

impl VectorStream {
    fn start(class: WorkClass, instruction: &str, max_length: usize, texts: &[String]) -> CallResult<Self> {
        check_limits(instruction, max_length, texts)?;
        let mut connection = Connection::open()?;
        connection.send(&ClientMessage::Embed(EmbedHeader {
            class,
            instruction: instruction.to_string(),
            max_length,
            max_request_tokens: gucs::max_request_tokens(),
            count: texts.len(),
        }))?;
        for chunk in text_chunks(texts) {
            connection.send(&ClientMessage::Texts(chunk.to_vec()))?;
        }
        Ok(Self {
            connection,
            expected: texts.len(),
            delivered: 0,
            ready: VecDeque::new(),
        })
    }

    fn wrong_count(&self, got: usize) -> CallError {
        CallError::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("nvembed model server returned {got} vectors for {} texts", self.expected),
            "See the server log.",
        )
    }

    fn try_next(&mut self) -> CallResult<Option<Vec<f32>>> {
        loop {
            if let Some(vector) = self.ready.pop_front() {
                self.delivered += 1;
                return Ok(Some(vector));
            }
            match self.connection.receive()? {
                ServerMessage::Vectors { dimension, values } => {
                    let got = self.delivered + values.len() / dimension;
                    if got > self.expected {
                        return Err(self.wrong_count(got));
                    }
                    self.ready.extend(values.chunks_exact(dimension).map(<[f32]>::to_vec));
                }
                ServerMessage::Done if self.delivered == self.expected => return Ok(None),
                ServerMessage::Done => return Err(self.wrong_count(self.delivered)),
                ServerMessage::Error { kind, message } => return Err(call_failed(kind, message)),
                other => return Err(protocol_violation(&other)),
            }
        }
    }
}

/// For SQL functions: a failure is raised as an ERROR.
impl Iterator for VectorStream {
    type Item = Vec<f32>;

    fn next(&mut self) -> Option<Vec<f32>> {
        self.try_next().unwrap_or_else(|e| e.raise())
    }
}

/// Many texts as bulk work, streamed back in input order.
pub fn embed_many(instruction: &str, texts: &[String]) -> VectorStream {
    VectorStream::start(WorkClass::Bulk, instruction, gucs::max_length(), texts).unwrap_or_else(|e| e.raise())
}

/// Many texts as bulk work, all vectors at once; failures are returned, not raised.
pub fn try_embed_batch(instruction: &str, max_length: usize, texts: &[String]) -> CallResult<Vec<Vec<f32>>> {
    let mut stream = VectorStream::start(WorkClass::Bulk, instruction, max_length, texts)?;
    let mut vectors = Vec::with_capacity(texts.len());
    // try_next checks the count at the end.
    while let Some(vector) = stream.try_next()? {
        vectors.push(vector);
    }
    Ok(vectors)
}

/// Single-text calls this backend answered lately, most recent first. A statement may evaluate
/// a call once per row (`ORDER BY embedding <#> nvembed_query('...')`, two query texts in one
/// WHERE, a re-rank of `nvembed_passage(body) <#> nvembed_query('...')`), and each would
/// otherwise be a model call: every distinct text of a statement is embedded once as long as
/// it has at most CACHE_ENTRIES of them. Keyed by everything that decides the vector (the
/// server's model, dtype and device as this backend last read them from the configuration),
/// so a reload that changes one is never answered from the cache.
const CACHE_ENTRIES: usize = 256;
/// Longer texts are not kept: the cache stays within a few MiB (CACHE_ENTRIES × (this + one
/// 4,096-float vector)), and a long text is rarely asked for twice.
const CACHE_TEXT_BYTES: usize = 16 * 1024;

#[derive(PartialEq, Eq, Hash)]
struct CallKey {
    model: String,
    dtype: String,
    device: String,
    instruction: String,
    text: String,
    max_length: usize,
}

thread_local! {
    static RECENT_CALLS: RefCell<lru::LruCache<CallKey, Vec<f32>>> =
        RefCell::new(lru::LruCache::new(std::num::NonZeroUsize::new(CACHE_ENTRIES).expect("non-zero")));
}

/// One text as interactive work.
pub fn embed_one(instruction: &str, text: String) -> Vec<f32> {
    let max_length = gucs::max_length();
    let settings = gucs::server_settings();
    let key = CallKey {
        model: settings.model,
        dtype: settings.dtype,
        device: settings.device,
        instruction: instruction.to_string(),
        text,
        max_length,
    };
    if let Some(vector) = RECENT_CALLS.with(|c| c.borrow_mut().get(&key).cloned()) {
        return vector;
    }
    let texts = [key.text.clone()];
    let mut stream =
        VectorStream::start(WorkClass::Interactive, instruction, max_length, &texts).unwrap_or_else(|e| e.raise());
    let vector = stream.next().unwrap_or_else(|| stream.wrong_count(0).raise());
    if stream.next().is_some() {
        stream.wrong_count(2).raise();
    }
    if key.text.len() <= CACHE_TEXT_BYTES {
        RECENT_CALLS.with(|c| c.borrow_mut().put(key, vector.clone()));
    }
    vector
}

/// Asks the model server for its status with plain blocking I/O bounded by `timeout` (no
/// ERROR, no interrupt checks: the supervisor uses it too). Returns the server's build and status.
pub fn query_status(timeout: Duration) -> std::io::Result<(String, Status)> {
    let mut stream = UnixStream::connect(SOCKET_NAME)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut request = Vec::new();
    ClientMessage::Hello { build: BUILD_ID.into() }.write(&mut request)?;
    ClientMessage::Status.write(&mut request)?;
    stream.write_all(&request)?;
    let unexpected = |what: &str| std::io::Error::new(IoErrorKind::InvalidData, format!("expected {what}"));
    let build = match ServerMessage::decode(nvembed_protocol::read_frame(&mut stream)?)? {
        ServerMessage::Hello { build } => build,
        _ => return Err(unexpected("a handshake")),
    };
    if build != BUILD_ID {
        return Ok((build, Status::default()));
    }
    match ServerMessage::decode(nvembed_protocol::read_frame(&mut stream)?)? {
        ServerMessage::Status(status) => Ok((build, status)),
        _ => Err(unexpected("a status")),
    }
}

/// The model server's status, or None when it is not running (or is being restarted).
pub fn status() -> Option<Status> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    match query_status(Duration::from_secs(5)) {
        Ok((build, status)) if build == BUILD_ID => Some(status),
        Ok((build, _)) => different_builds(&build).raise(),
        Err(_) => None,
    }
}
