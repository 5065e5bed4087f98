//! One client connection: the build handshake, admission to the connection limits, then status
//! or embedding calls. An embedding call's texts are admitted (tokenized and measured, chunk by
//! chunk as they arrive) here, in the connection's thread, then handed to the scheduler; its
//! vectors are written back in input order, in bounded chunks, as the scheduler delivers them.
//! A client that hangs up (a cancelled or timed-out query, a reset connection) cancels its call
//! within `HANGUP_POLL`, whether it is still sending texts or waiting for vectors.

use std::collections::BTreeMap;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvembed_protocol::{
    frame_length, read_frame_body, vectors_per_chunk, ChunkHeader, ClientMessage, EmbedHeader, ErrorKind, Identity,
    ServerMessage, Status, WorkClass, BUILD_ID, MAX_CONTROL_FRAME_BYTES, MAX_FRAME_BYTES, MAX_INSTRUCTION_BYTES,
    MAX_LENGTH, MAX_TEXT_BYTES, SPANS_PER_MESSAGE,
};

use nvembed_engine::{chunk_spans, chunk_text_budget};

use crate::admission::{check_count, Admission, Stop};
use crate::limits::{tokenizers_at_once, Budget, Gate, Limits, Opened, Reserved, Throttled, ADMISSION_BYTES};
use crate::model::ModelSlot;
use crate::scheduler::{Event, Scheduler};
use crate::stats::Stats;
use crate::tokens::Tokens;

/// How often a connection waiting for results checks whether its client hung up.
const HANGUP_POLL: Duration = Duration::from_millis(50);

pub struct Server {
    pub model: ModelSlot,
    pub scheduler: Arc<Scheduler>,
    pub stats: Arc<Stats>,
    /// How many times the supervisor has restarted the server (reported in status).
    pub restarts: u64,
    pub limits: Limits,
    pub(crate) gate: Arc<Gate>,
    pub(crate) texts: Arc<Budget>,
    /// Slots for bulk calls' tokenizing.
    pub(crate) tokenizers: Arc<Budget>,
}

impl Server {
    pub fn new(model: ModelSlot, scheduler: Arc<Scheduler>, stats: Arc<Stats>, restarts: u64, limits: Limits) -> Self {
        Self {
            model,
            scheduler,
            stats,
            restarts,
            limits,
            gate: Arc::default(),
            texts: Arc::new(Budget::new(ADMISSION_BYTES)),
            tokenizers: Arc::new(Budget::new(tokenizers_at_once())),
        }
    }

    pub(crate) fn status(&self) -> Status {
        let loaded = self.model.loaded();
        let settings = self.model.settings();
        Status {
            loaded: loaded.is_some(),
            model: settings.model.clone(),
            revision: self.model.revision(),
            // What `auto` chose, once the model is loaded.
            dtype: loaded.as_ref().map_or_else(|| settings.dtype.clone(), |m| m.dtype_name()),
            device: settings.device.clone(),
            dimension: loaded.as_ref().map(|m| m.embedding_dim()),
            load_seconds: loaded.as_ref().map(|m| m.load_seconds()),
            requests: Stats::get(&self.stats.requests),
            tokens: Stats::get(&self.stats.tokens),
            rows: [WorkClass::Interactive, WorkClass::Bulk]
                .into_iter()
                // `get`, not `get_or_create`: a status request must not add series to /metrics.
                .map(|class| self.stats.by_class.rows.get(&class.into()).map_or(0, |c| c.get()))
                .sum(),
            waiting: Stats::get(&self.stats.waiting),
            active_rows: Stats::get(&self.stats.active_rows),
            cancelled_rows: Stats::get(&self.stats.cancelled_rows),
            restarts: self.restarts,
            pid: std::process::id(),
            connections: self.gate.admitted() as u64,
            refused_connections: Stats::get(&self.stats.refused_connections),
            interactive_seconds: Stats::seconds(&self.stats.interactive_micros),
            bulk_seconds: Stats::seconds(&self.stats.bulk_micros),
            load_error: self.model.health().err(),
        }
    }
}

/// A client's end of a connection: the Unix socket, or TLS over TCP (`native.rs`).
pub trait Peer: Read + Write {
    /// The socket underneath: for hang-up checks and the send queue's length, which look at
    /// the socket itself (a TLS peer's close is its TCP close: clients send no close_notify).
    fn socket(&self) -> RawFd;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Peer for UnixStream {
    fn socket(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

/// Whether the peer is gone: it closed its end (a cancelled backend drops its connection) or
/// the connection was reset.
fn hung_up(socket: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: peeking one byte into a valid buffer on an open socket.
    let n = unsafe { libc::recv(socket, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(std::io::Error::last_os_error().kind(), IoErrorKind::WouldBlock | IoErrorKind::Interrupted),
    }
}

/// Vectors of `dimension` floats the client has read of the `written` ones: those still in the
/// socket's send queue (SIOCOUTQ) are not read yet.
fn read_by_client(socket: RawFd, written: usize, dimension: usize) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) stores the send queue's length into a valid int.
    let ok = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) } == 0;
    let unread = if ok { usize::try_from(queued).unwrap_or(0) } else { 0 };
    written.saturating_sub(unread.div_ceil(dimension * 4))
}

static DROPPED: Throttled = Throttled::new();

/// Reads from a socket, each read bounded by what is left until `deadline`: a peer that drips
/// a byte at a time still has only until then.
struct Timed<'a, P: Peer> {
    stream: &'a mut P,
    deadline: Instant,
}

impl<P: Peer> Read for Timed<'_, P> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(IoErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Reads one message, whole by `deadline`. A call's texts may use a whole frame, whose bytes
/// are first taken from the server's text budget (held until the returned reservation is
/// dropped); every other message must fit `MAX_CONTROL_FRAME_BYTES`. None when the client
/// left, was too slow, or broke the protocol (logged).
fn read_message<P: Peer>(
    stream: &mut P,
    server: &Server,
    texts_expected: bool,
    deadline: Instant,
) -> Option<(ClientMessage, Option<Reserved>)> {
    let socket = stream.socket();
    let mut input = Timed { stream, deadline };
    let mut header = [0u8; 4];
    input.read_exact(&mut header).ok()?;
    let len = match frame_length(header) {
        Ok(len) => len,
        Err(e) => {
            DROPPED.log(|| format!("dropping a connection: {e}"));
            return None;
        }
    };
    let mut tag = [0u8; 1];
    input.read_exact(&mut tag).ok()?;
    let tag = tag[0];
    let is_texts = tag == ClientMessage::TEXTS_TAG;
    let limit = if is_texts && texts_expected { MAX_FRAME_BYTES } else { MAX_CONTROL_FRAME_BYTES };
    if len > limit {
        DROPPED.log(|| format!("dropping a connection that sent a frame of {len} bytes where at most {limit} fit"));
        return None;
    }
    let (reserved, deadline) = if is_texts && texts_expected {
        // Read and decoded, a frame is held twice until its texts are tokenized. The time spent
        // waiting for room is the server's, not the client's.
        let reserved = server.texts.reserve(2 * len, || hung_up(socket))?;
        (Some(reserved), Instant::now() + server.limits.idle_timeout)
    } else {
        (None, deadline)
    };
    let mut input = Timed {
        stream: input.stream,
        deadline,
    };
    let frame = read_frame_body(&mut [tag].as_slice().chain(&mut input), len).ok()?;
    match ClientMessage::decode(frame) {
        Ok(message) => Some((message, reserved)),
        Err(e) => {
            DROPPED.log(|| format!("dropping a connection: {e}"));
            None
        }
    }
}

/// Who may use a listener, and what one call may ask of it.
pub enum Access {
    /// The cluster's own Unix socket, which only its OS user can reach: the backend's own
    /// settings (`nvembed.max_request_tokens`) are the limits.
    Local,
    /// A network listener (`native.rs`).
    Network {
        /// None: no token needed (`--no-tokens`).
        tokens: Option<Arc<Tokens>>,
        /// Ceiling on a call's `max_request_tokens`, whatever the client asks.
        max_request_tokens: usize,
    },
}

/// The name a client's connections count under, and on the network the group whose
/// connections count together (the token's name, or the peer's address without a token), or
/// why it is refused. On a network listener the group comes first in the name, so two
/// clusters' roles of one name are counted apart.
fn client_name(identity: &Identity, access: &Access, peer: &str) -> Result<(String, Option<String>), (ErrorKind, String)> {
    let group = match access {
        Access::Local => return Ok((identity.role.clone(), None)),
        Access::Network { tokens: None, .. } => peer
            .parse::<std::net::SocketAddr>()
            .map_or_else(|_| peer.to_string(), |address| address.ip().to_canonical().to_string()),
        Access::Network { tokens: Some(tokens), .. } => {
            match identity.token.as_deref().and_then(|t| tokens.check(t.as_bytes())) {
                Some(name) => name.to_string(),
                None => {
                    return Err((
                        ErrorKind::Unauthorized,
                        format!(
                            "the model server does not accept {} token",
                            if identity.token.is_some() { "this" } else { "a connection without a" }
                        ),
                    ))
                }
            }
        }
    };
    Ok((format!("{group}/{}", identity.role), Some(group)))
}

/// Serves one client until it hangs up, goes silent or breaks the protocol. `peer` names it
/// in logs.
pub fn serve_client<P: Peer>(mut stream: P, server: &Server, mut opened: Opened, access: &Access, peer: &str) {
    // Until it is admitted (or has its status), a connection has the handshake timeout in all.
    let handshake_deadline = Instant::now() + server.limits.handshake_timeout;
    match read_message(&mut stream, server, false, handshake_deadline) {
        Some((ClientMessage::Hello { build }, _)) => {
            if (ServerMessage::Hello { build: BUILD_ID.into() })
                .write(&mut stream)
                .is_err()
            {
                return;
            }
            if build != BUILD_ID {
                eprintln!("nvembed-model-server: refusing a client of another build ({build}; this is {BUILD_ID})");
                return;
            }
        }
        Some(_) => {
            DROPPED.log(|| "dropping a connection that did not start with a handshake".into());
            return;
        }
        None => return,
    }
    loop {
        let deadline = if opened.is_admitted() {
            Instant::now() + server.limits.idle_timeout
        } else {
            handshake_deadline
        };
        let served = match read_message(&mut stream, server, false, deadline) {
            // On the network, only an admitted client may read the status (paths, process ids).
            Some((ClientMessage::Status, _)) if matches!(access, Access::Local) || opened.is_admitted() => {
                ServerMessage::Status(server.status()).write(&mut stream).is_ok()
            }
            Some((ClientMessage::Identify(identity), _)) => match client_name(&identity, access, peer)
                .and_then(|(client, group)| {
                    opened.admit(&client, identity.role_connections, group.as_deref(), &server.limits)
                })
            {
                Ok(()) => (ServerMessage::Ready { served: server.model.served() }).write(&mut stream).is_ok(),
                Err((kind, message)) => {
                    Stats::add(&server.stats.refused_connections, 1);
                    REFUSED.log(|| format!("refusing a connection from {peer}: {message}"));
                    let _ = ServerMessage::Error { kind, message }.write(&mut stream);
                    false
                }
            },
            Some((ClientMessage::Embed(mut header), _)) if opened.is_admitted() => {
                if let Access::Network { max_request_tokens, .. } = access {
                    header.max_request_tokens = header.max_request_tokens.min(*max_request_tokens);
                }
                embed(&mut stream, server, opened.client(), header)
            }
            Some((ClientMessage::Chunk(header), _)) if opened.is_admitted() => chunk(&mut stream, server, header),
            Some((other, _)) => {
                DROPPED.log(|| format!("dropping a connection that sent {} out of turn", other.name()));
                false
            }
            None => false,
        };
        if !served {
            return;
        }
    }
}

static REFUSED: Throttled = Throttled::new();

/// Answers one embedding call; false when the connection cannot go on. A call refused before
/// all its texts arrived ends the connection: what the client still sends is never read.
fn embed<P: Peer>(stream: &mut P, server: &Server, client: &str, header: EmbedHeader) -> bool {
    let socket = stream.socket();
    let refuse = |stream: &mut P, kind: ErrorKind, message: String| {
        let _ = ServerMessage::Error { kind, message }.write(stream);
        false
    };
    if let Err((kind, message)) = check_count(&header) {
        return refuse(stream, kind, message);
    }
    if header.count == 0 {
        return ServerMessage::Done.write(stream).is_ok();
    }
    let error = |stream: &mut P, kind: ErrorKind, message: String| {
        // The caller's HINT for these says "see the server log" (load errors are logged where
        // the load fails; oversized or unpoolable inputs are the caller's own).
        if matches!(kind, ErrorKind::Internal | ErrorKind::NonFinite) {
            eprintln!("nvembed-model-server: {message}");
        }
        ServerMessage::Error { kind, message }.write(stream).is_ok()
    };
    let model = match server.model.get(|| hung_up(socket)) {
        Ok(Some(model)) => model,
        Ok(None) => return false,
        Err(message) => return refuse(stream, ErrorKind::Load, message),
    };
    let mut admission = match Admission::new(&model, &header) {
        Ok(admission) => admission,
        Err((kind, message)) => return refuse(stream, kind, message),
    };
    while admission.received() < header.count {
        match read_message(stream, server, true, Instant::now() + server.limits.idle_timeout) {
            Some((ClientMessage::Texts(chunk), _reserved)) if admission.received() + chunk.len() <= header.count => {
                // Bulk calls take turns at tokenizing; a one-text call never waits for them.
                let _slot = if header.count > 1 {
                    match server.tokenizers.reserve(1, || hung_up(socket)) {
                        Some(slot) => Some(slot),
                        None => return false,
                    }
                } else {
                    None
                };
                match admission.add(&chunk, || hung_up(socket)) {
                    Ok(()) => {}
                    Err(Stop::Refused((kind, message))) => return refuse(stream, kind, message),
                    Err(Stop::Gone) => return false,
                }
            }
            Some((other, _)) => {
                DROPPED.log(|| format!("dropping a connection that sent {} amid a call's texts", other.name()));
                return false;
            }
            None => return false,
        }
    }
    let inputs = admission.finish();
    let count = inputs.len();
    let dimension = model.embedding_dim();
    let chunk_rows = vectors_per_chunk(dimension);
    Stats::add(&server.stats.waiting, 1);
    let handle = server.scheduler.submit(client, header.class, inputs, model);
    let mut finished: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut written = 0;
    let outcome = loop {
        if written == count {
            Stats::add(&server.stats.requests, 1);
            break ServerMessage::Done.write(stream).is_ok();
        }
        let event = match handle.events.recv_timeout(HANGUP_POLL) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) if hung_up(socket) => break false,
            Err(RecvTimeoutError::Timeout) => {
                // The client reads on: the scheduler may compute further ahead.
                handle.set_read(read_by_client(socket, written, dimension));
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                break error(stream, ErrorKind::Internal, "the scheduler stopped".into())
            }
        };
        let mut event = Some(event);
        // Take whatever else is ready, then write the contiguous prefix.
        while let Some(next) = event.take() {
            match next {
                Event::Vector { index, vector } => {
                    finished.insert(index, vector);
                }
                Event::Failed { kind, message } => {
                    let sent = error(stream, kind, message);
                    Stats::sub(&server.stats.waiting, 1);
                    return sent;
                }
            }
            match handle.events.try_recv() {
                Ok(more) => event = Some(more),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
        }
        let mut sent_ok = true;
        while finished.first_key_value().is_some_and(|(&index, _)| index == written) {
            let mut values = Vec::with_capacity(chunk_rows.min(count - written) * dimension);
            while values.len() < chunk_rows * dimension {
                match finished.first_key_value() {
                    Some((&index, _)) if index == written => {
                        values.extend(finished.pop_first().expect("present").1);
                        written += 1;
                    }
                    _ => break,
                }
            }
            if (ServerMessage::Vectors { dimension, values }).write(stream).is_err() {
                sent_ok = false;
                break;
            }
            handle.set_read(read_by_client(socket, written, dimension));
        }
        if !sent_ok {
            break false;
        }
    };
    if !outcome || written < count {
        handle.cancel();
    }
    Stats::sub(&server.stats.waiting, 1);
    outcome
}

/// Answers one chunking call (texts cut by the model's tokenizer; no model compute); false when
/// the connection cannot go on.
fn chunk<P: Peer>(stream: &mut P, server: &Server, header: ChunkHeader) -> bool {
    let socket = stream.socket();
    let refuse = |stream: &mut P, kind: ErrorKind, message: String| {
        let _ = ServerMessage::Error { kind, message }.write(stream);
        false
    };
    if header.instruction.len() > MAX_INSTRUCTION_BYTES {
        let message = format!(
            "an instruction of {} bytes is longer than the {MAX_INSTRUCTION_BYTES} bytes an instruction may have",
            header.instruction.len()
        );
        return refuse(stream, ErrorKind::TooLarge, message);
    }
    if header.max_tokens > MAX_LENGTH {
        let message = format!("chunks of {} tokens are longer than the model's {MAX_LENGTH}", header.max_tokens);
        return refuse(stream, ErrorKind::InvalidInput, message);
    }
    // The tokenizer is the model's: loaded with it (the chunks are embedded next anyway).
    let model = match server.model.get(|| hung_up(socket)) {
        Ok(Some(model)) => model,
        Ok(None) => return false,
        Err(message) => return refuse(stream, ErrorKind::Load, message),
    };
    let encoder = model.encoder();
    // A budget the instruction leaves no room in is refused before any text is read.
    if let Err(e) = chunk_text_budget(encoder, &header.instruction, header.max_tokens) {
        return refuse(stream, ErrorKind::InvalidInput, e.to_string());
    }
    let mut received = 0;
    while received < header.count {
        // Held until the texts are answered: they count against the server's text budget.
        let (chunk, _reserved) = match read_message(stream, server, true, Instant::now() + server.limits.idle_timeout) {
            Some((ClientMessage::Texts(chunk), reserved)) if received + chunk.len() <= header.count => (chunk, reserved),
            Some((other, _)) => {
                DROPPED.log(|| format!("dropping a connection that sent {} amid a call's texts", other.name()));
                return false;
            }
            None => return false,
        };
        let Some(_slot) = server.tokenizers.reserve(1, || hung_up(socket)) else {
            return false;
        };
        for text in &chunk {
            if text.len() > MAX_TEXT_BYTES {
                let message = format!("a text of {} bytes is longer than the {MAX_TEXT_BYTES} bytes one text may have", text.len());
                return refuse(stream, ErrorKind::TooLarge, message);
            }
            let spans = match chunk_spans(encoder, &header.instruction, text, header.max_tokens, header.overlap, &|| {
                hung_up(socket)
            }) {
                Ok(spans) => spans,
                Err(nvembed_engine::Error::Cancelled) => return false,
                Err(e) => return refuse(stream, ErrorKind::InvalidInput, e.to_string()),
            };
            let spans: Vec<_> = spans.into_iter().map(|s| (s.start as u64, s.end as u64)).collect();
            // Every text has a message: the last one says its chunks are all there.
            let mut parts: Vec<&[(u64, u64)]> = spans.chunks(SPANS_PER_MESSAGE).collect();
            if parts.is_empty() {
                parts.push(&[]);
            }
            let count = parts.len();
            for (i, part) in parts.into_iter().enumerate() {
                let message = ServerMessage::Spans {
                    text: received as u64,
                    spans: part.to_vec(),
                    last: i + 1 == count,
                };
                if message.write(stream).is_err() {
                    return false;
                }
            }
            received += 1;
        }
    }
    ServerMessage::Done.write(stream).is_ok()
}

/// After a failed accept (out of descriptors, memory or threads), the listener waits this long
/// before it tries again, serving the clients it has meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

static ACCEPT_FAILED: Throttled = Throttled::new();
static FULL: Throttled = Throttled::new();

/// Listens on `socket` (replacing a stale socket file, private to this OS user) and serves
/// every client in its own thread; runs until the process ends. The scheduler runs in its own
/// thread (`Scheduler::run`), started by the caller.
pub fn serve(socket: &Path, server: Arc<Server>) -> std::io::Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == IoErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends leave the connection queued: retrying at once would spin.
                ACCEPT_FAILED.log(|| format!("cannot accept a connection ({e}); pausing new connections"));
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let Some(opened) = server.gate.open(server.limits.hard_cap()) else {
            Stats::add(&server.stats.refused_connections, 1);
            FULL.log(|| format!("refusing a connection unread: {} connections are open", server.limits.hard_cap()));
            // Said without reading or waiting: the client reads it in place of the handshake.
            let _ = stream.set_nonblocking(true);
            let _ = (ServerMessage::Error {
                kind: ErrorKind::Busy,
                message: format!("the model server has {} connections open, its limit", server.limits.hard_cap()),
            })
            .write(&mut &stream);
            continue;
        };
        let client = server.clone();
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || serve_client(stream, &client, opened, &Access::Local, "the local socket"));
        if let Err(e) = spawned {
            ACCEPT_FAILED.log(|| format!("cannot start a thread for a connection ({e}); pausing new connections"));
            std::thread::sleep(ACCEPT_BACKOFF);
        }
    }
}
