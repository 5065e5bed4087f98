//! One connection to a model server: the cluster's own on its Unix socket (waiting while the
//! supervisor starts it), or a remote one in TLS. It passes the build handshake and is admitted
//! (a token for a remote server) before any call; every wait on it can be cancelled.

use std::cell::RefCell;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nvembed_protocol::{decode_frame, ClientMessage, ErrorKind, Identity, Served, ServerMessage, BUILD_ID, SOCKET_NAME};
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::call_error::{check_interrupts, lost, still_waiting, CallError, CallResult, Blame};
use crate::endpoints::Remote;
use crate::gucs;
use crate::transport::{connect_remote, Stream, POLL_INTERVAL};

/// Set in `_PG_init` when loaded through shared_preload_libraries (inherited by backends).
pub static PRELOADED: AtomicBool = AtomicBool::new(false);

/// How long to wait for the model server's socket while the supervisor (re)starts it.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// A connection to a model server that passed the build handshake and was admitted.
pub struct Connection {
    stream: Stream,
    /// The remote server's address as `nvembed.servers` writes it; None: the local server.
    pub server: Option<String>,
    received: Vec<u8>,
    start: usize,
}

pub fn not_preloaded() -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "nvembed is not loaded through shared_preload_libraries".into(),
        "Add shared_preload_libraries = 'nvembed' to postgresql.conf and restart PostgreSQL.",
    )
}

impl Connection {
    /// Connects to the local server, waiting up to CONNECT_WAIT while the supervisor
    /// (re)starts it.
    pub fn open_local() -> CallResult<Self> {
        if !PRELOADED.load(Ordering::Relaxed) {
            return Err(not_preloaded());
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
            stream: Stream::Unix(stream),
            server: None,
            received: Vec::new(),
            start: 0,
        };
        connection.handshake(None)?;
        Ok(connection)
    }

    /// Connects to `remote` in TLS and is admitted with this cluster's token. Also returns what
    /// the server serves (None while it loads its model).
    pub fn open_remote(remote: &Remote) -> CallResult<(Self, Option<Served>)> {
        if !PRELOADED.load(Ordering::Relaxed) {
            return Err(not_preloaded());
        }
        let token = crate::transport::token()?;
        let mut connection = Self {
            stream: connect_remote(remote)?,
            server: Some(remote.address.clone()),
            received: Vec::new(),
            start: 0,
        };
        let served = connection.handshake(token)?;
        Ok((connection, served))
    }

    /// The build handshake and admission; what the server serves, once loaded.
    fn handshake(&mut self, token: Option<String>) -> CallResult<Option<Served>> {
        self.send(&ClientMessage::Hello { build: BUILD_ID.into() })?;
        self.send(&ClientMessage::Identify(Identity {
            role: session_role(),
            role_connections: gucs::max_calls_per_role(),
            token,
        }))?;
        match self.receive()? {
            ServerMessage::Hello { build } if build == BUILD_ID => {}
            ServerMessage::Hello { build } => return Err(self.named(different_builds(&build))),
            // A server at its connection limit says so in place of the handshake.
            ServerMessage::Error { kind, message } => return Err(self.failed(kind, message)),
            other => return Err(self.named(protocol_violation(&other))),
        }
        match self.receive()? {
            ServerMessage::Ready { served } => Ok(served),
            ServerMessage::Error { kind, message } => Err(self.failed(kind, message)),
            other => Err(self.named(protocol_violation(&other))),
        }
    }

    /// An error about this connection, naming its server when it is a remote one.
    pub fn named(&self, mut error: CallError) -> CallError {
        if let Some(server) = &self.server {
            error.message = format!("{} (model server {server})", error.message);
        }
        error
    }

    /// The server's own error for a call.
    pub fn failed(&self, kind: ErrorKind, message: String) -> CallError {
        self.named(call_failed(kind, message))
    }

    /// The connection was lost.
    pub fn lost(&self, e: std::io::Error) -> CallError {
        match &self.server {
            None => lost(e),
            Some(server) => CallError::blaming(
                Blame::Connection,
                PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                format!("nvembed model server {server} connection lost: {e}"),
                "The server exited or the network failed; the call was sent to another server of nvembed.servers where \
                 one was left. nvembed_status() shows every server's last error.",
            ),
        }
    }

    pub fn send(&mut self, message: &ClientMessage) -> CallResult<()> {
        let mut frame = Vec::new();
        message.write(&mut frame).map_err(|e| self.lost(e))?;
        let mut sent = 0;
        while sent < frame.len() {
            match self.stream.write(&frame[sent..]) {
                Ok(0) => return Err(self.lost(IoErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(e) if still_waiting(&e) => check_interrupts()?,
                Err(e) if matches!(e.kind(), IoErrorKind::BrokenPipe | IoErrorKind::ConnectionReset) => {
                    // The server may have refused the call before reading all of it, and closed
                    // the connection: its reason waits in the socket.
                    return Err(match self.receive() {
                        Ok(ServerMessage::Error { kind, message }) => self.failed(kind, message),
                        _ => self.lost(e),
                    });
                }
                Err(e) => return Err(self.lost(e)),
            }
        }
        Ok(())
    }

    /// The next message, waiting for it.
    pub fn receive(&mut self) -> CallResult<ServerMessage> {
        loop {
            if let Some(message) = self.try_receive()? {
                return Ok(message);
            }
            check_interrupts()?;
        }
    }

    /// The next message if one arrives within one read (at most POLL_INTERVAL); None otherwise.
    pub fn try_receive(&mut self) -> CallResult<Option<ServerMessage>> {
        let mut chunk = [0u8; 64 << 10];
        for attempt in 0..2 {
            match decode_frame(&self.received[self.start..]) {
                Ok(Some((frame, used))) => {
                    self.start += used;
                    if self.start == self.received.len() {
                        self.received.clear();
                        self.start = 0;
                    }
                    return ServerMessage::decode(frame).map(Some).map_err(|e| self.lost(e));
                }
                Ok(None) if attempt == 1 => return Ok(None),
                Ok(None) => {}
                Err(e) => return Err(self.lost(e)),
            }
            if self.start > 0 {
                self.received.drain(..self.start);
                self.start = 0;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(self.lost(IoErrorKind::UnexpectedEof.into())),
                Ok(n) => self.received.extend_from_slice(&chunk[..n]),
                Err(e) if still_waiting(&e) => return Ok(None),
                Err(e) => return Err(self.lost(e)),
            }
        }
        Ok(None)
    }
}

pub fn different_builds(server_build: &str) -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
        format!("nvembed.so ({BUILD_ID}) and the model server ({server_build}) come from different builds"),
        "Reinstall nvembed so that both come from one build (make install, or the package), then restart PostgreSQL.",
    )
}

pub fn protocol_violation(message: &ServerMessage) -> CallError {
    let what = match message {
        ServerMessage::Hello { .. } => "a handshake",
        ServerMessage::Status(_) => "a status",
        ServerMessage::Ready { .. } => "an admission",
        ServerMessage::Vectors { .. } => "vectors",
        ServerMessage::Spans { .. } => "chunks",
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
pub fn call_failed(kind: ErrorKind, message: String) -> CallError {
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
        ErrorKind::Unauthorized => CallError::new(
            PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            format!("nvembed: {message}"),
            "Put a token the server's --tokens-file lists into the file nvembed.server_token_file names, then reload.",
        ),
        ErrorKind::Busy => CallError::new(
            PgSqlErrorCode::ERRCODE_TOO_MANY_CONNECTIONS,
            format!("nvembed: {message}"),
            "Close cursors over nvembed_passages / nvembed_queries that are no longer read, or retry later. A superuser \
             can give a role more with ALTER ROLE ... SET nvembed.max_calls_per_role; on a remote server, all roles \
             of one token share a quarter of its --max-connections.",
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
