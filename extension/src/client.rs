//! The calls: one text as interactive work, many as bulk work, streamed back in input order.
//! Each call goes to one server (`endpoints` chooses it); a call whose remote server dies
//! before answering is sent again, for the texts not yet answered, to another server
//! (embedding is idempotent, and the caller only ever sees each vector once). Leaving a call
//! (an ERROR, a cancel, a LIMIT that stops reading rows) closes its connection, which is how the
//! server learns to stop computing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{ErrorKind as IoErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nvembed_protocol::{
    text_chunks, ChunkHeader, ClientMessage, EmbedHeader, ErrorKind, ServerMessage, Status, WorkClass, BUILD_ID,
    MAX_INSTRUCTION_BYTES, MAX_TEXT_BYTES, SOCKET_NAME,
};
use pgrx::PgSqlErrorCode;

pub use crate::call_error::{Blame, CallError};
use crate::call_error::{check_interrupts, CallResult};
use crate::connection::{different_builds, protocol_violation, Connection, PRELOADED};
use crate::endpoints::{self, Lease, Remote};
use crate::gucs;

/// Times one call is sent again after its remote server died under it. Once: a text that
/// crashes servers takes down at most two this way before the vectorizer tries it alone.
const MAX_RESENDS: usize = 1;

fn refused(remote: &Remote, why: String) -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
        format!("nvembed refuses model server {}: {why}", remote.address),
        "Every server of nvembed.servers must serve nvembed.model in one revision and dtype (vectors of two models \
         must never mix in a column): start that server with the same checkpoint and --dtype as the others, or \
         remove it from nvembed.servers.",
    )
}

/// A connection to a server for a call of `bytes` text bytes, and its lease on that server's
/// share of work: the local server, or the least busy remote one not in `tried` that can be
/// reached, is admitted and serves the cluster's model. A server that cannot be used is
/// recorded (down for a while, with its error) and the next one tried; when none is left,
/// the last one's error.
fn open(bytes: u64, tried: &mut Vec<String>) -> CallResult<(Connection, Option<Lease>)> {
    let listed = endpoints::remotes();
    if listed.is_empty() {
        return Ok((Connection::open_local()?, None));
    }
    // The shared memory of `endpoints` exists only when preloaded.
    if !PRELOADED.load(Ordering::Relaxed) {
        return Err(crate::connection::not_preloaded());
    }
    let mut last_error = None;
    while let Some((remote, lease)) = endpoints::choose(&listed, tried, bytes) {
        tried.push(remote.address.clone());
        let opened = Connection::open_remote(&remote).and_then(|(connection, served)| {
            let served =
                served.ok_or_else(|| refused(&remote, "it has not loaded its model yet".into()))?;
            endpoints::check_served(&served).map_err(|why| refused(&remote, why))?;
            Ok(connection)
        });
        match opened {
            Ok(connection) => {
                endpoints::succeeded(&remote.address);
                return Ok((connection, Some(lease)));
            }
            Err(e) if e.code == PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN => return Err(e),
            // This backend's own configuration (an unreadable token or CA file) is no server's
            // fault: every server would fail alike.
            Err(e) if e.code == PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR => return Err(e),
            Err(e) => {
                // A busy server is up: it is only skipped by this call.
                let down = e.code != PgSqlErrorCode::ERRCODE_TOO_MANY_CONNECTIONS;
                endpoints::failed(&remote.address, &e.message, down);
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        CallError::new(
            PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            "nvembed: no model server of nvembed.servers is left to try".into(),
            "nvembed_status() shows every server's last error.",
        )
    }))
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
    /// The server's share of work this call holds (remote servers only).
    lease: Option<Lease>,
    class: WorkClass,
    instruction: String,
    max_length: usize,
    /// The call's texts, kept to send again if a remote server dies (None: the local server,
    /// which its supervisor restarts; the caller retries).
    texts: Option<Vec<String>>,
    /// Remote servers this call has tried.
    tried: Vec<String>,
    resends: usize,
    max_resends: usize,
    expected: usize,
    delivered: usize,
    ready: VecDeque<Vec<f32>>,
}

fn text_bytes(texts: &[String]) -> u64 {
    texts.iter().map(|t| t.len() as u64).sum()
}

/// Sends one call on `connection`.
fn send_call(connection: &mut Connection, class: WorkClass, instruction: &str, max_length: usize, texts: &[String]) -> CallResult<()> {
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
    Ok(())
}

/// Whether a call that failed with `error` may go to another server: one is left that it has
/// not tried (else the caller sees what happened to the last one, not "no server left").
fn may_resend(error: &CallError, texts: &Option<Vec<String>>, resends: usize, max_resends: usize, tried: &[String]) -> bool {
    error.blame == Blame::Connection
        && texts.is_some()
        && resends < max_resends
        && endpoints::remotes().iter().any(|r| !tried.contains(&r.address))
}

impl VectorStream {
    fn start(class: WorkClass, instruction: &str, max_length: usize, texts: &[String]) -> CallResult<Self> {
        Self::start_resending(class, instruction, max_length, texts, MAX_RESENDS)
    }

    fn start_resending(
        class: WorkClass,
        instruction: &str,
        max_length: usize,
        texts: &[String],
        max_resends: usize,
    ) -> CallResult<Self> {
        check_limits(instruction, max_length, texts)?;
        let mut tried = Vec::new();
        let (mut connection, mut lease) = open(text_bytes(texts), &mut tried)?;
        let kept = connection.server.is_some().then(|| texts.to_vec());
        let mut resends = 0;
        while let Err(e) = send_call(&mut connection, class, instruction, max_length, texts) {
            if !may_resend(&e, &kept, resends, max_resends, &tried) {
                return Err(e);
            }
            endpoints::failed(connection.server.as_deref().unwrap_or_default(), &e.message, true);
            resends += 1;
            (connection, lease) = open(text_bytes(texts), &mut tried)?;
        }
        Ok(Self {
            connection,
            lease,
            class,
            instruction: instruction.to_string(),
            max_length,
            texts: kept,
            tried,
            resends,
            max_resends,
            expected: texts.len(),
            delivered: 0,
            ready: VecDeque::new(),
        })
    }

    fn wrong_count(&self, got: usize) -> CallError {
        self.connection.named(CallError::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("nvembed model server returned {got} vectors for {} texts", self.expected),
            "See the server log.",
        ))
    }

    /// Sends the texts not yet answered to another server, after `error` lost this one.
    fn resend(&mut self, error: CallError) -> CallResult<()> {
        endpoints::failed(self.connection.server.as_deref().unwrap_or_default(), &error.message, true);
        self.resends += 1;
        let from = self.delivered + self.ready.len();
        let rest = &self.texts.as_ref().expect("kept for a remote server")[from..];
        self.lease = None;
        let (mut connection, lease) = open(text_bytes(rest), &mut self.tried)?;
        send_call(&mut connection, self.class, &self.instruction, self.max_length, rest)?;
        self.connection = connection;
        self.lease = lease;
        Ok(())
    }

    /// The next vector; with `wait` false, gives up after one read (Ok(Err(()))).
    fn step(&mut self, wait: bool) -> CallResult<Result<Option<Vec<f32>>, ()>> {
        loop {
            if let Some(vector) = self.ready.pop_front() {
                self.delivered += 1;
                return Ok(Ok(Some(vector)));
            }
            let message = match self.connection.try_receive() {
                Ok(Some(message)) => message,
                Ok(None) if wait => {
                    check_interrupts()?;
                    continue;
                }
                Ok(None) => return Ok(Err(())),
                // Lost after the last vector, before `Done`: every vector is here.
                Err(_) if self.delivered + self.ready.len() == self.expected && self.texts.is_some() => {
                    if self.ready.is_empty() {
                        self.lease = None;
                        return Ok(Ok(None));
                    }
                    continue;
                }
                Err(e) if may_resend(&e, &self.texts, self.resends, self.max_resends, &self.tried) => {
                    self.resend(e)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match message {
                ServerMessage::Vectors { dimension, values } => {
                    let got = self.delivered + self.ready.len() + values.len() / dimension;
                    if got > self.expected {
                        return Err(self.wrong_count(got));
                    }
                    self.ready.extend(values.chunks_exact(dimension).map(<[f32]>::to_vec));
                }
                ServerMessage::Done if self.delivered == self.expected => {
                    self.lease = None;
                    return Ok(Ok(None));
                }
                ServerMessage::Done => return Err(self.wrong_count(self.delivered)),
                ServerMessage::Error { kind, message } => return Err(self.connection.failed(kind, message)),
                other => return Err(self.connection.named(protocol_violation(&other))),
            }
        }
    }

    fn try_next(&mut self) -> CallResult<Option<Vec<f32>>> {
        Ok(self.step(true)?.expect("a waiting step returns"))
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

/// One bulk call of a batch of calls.
pub struct BatchCall<'a> {
    pub instruction: &'a str,
    pub max_length: usize,
    pub texts: &'a [String],
}

/// Runs `calls` at once, each on its own server where there are enough (the least busy ones
/// first), and returns each call's vectors or failure. A vectorizer worker keeps every server
/// busy this way.
pub fn try_embed_batches(calls: &[BatchCall]) -> Vec<CallResult<Vec<Vec<f32>>>> {
    let mut running: Vec<Option<(VectorStream, Vec<Vec<f32>>)>> = Vec::with_capacity(calls.len());
    let mut results: Vec<Option<CallResult<Vec<Vec<f32>>>>> = Vec::with_capacity(calls.len());
    for call in calls {
        if call.texts.is_empty() {
            running.push(None);
            results.push(Some(Ok(Vec::new())));
            continue;
        }
        match VectorStream::start(WorkClass::Bulk, call.instruction, call.max_length, call.texts) {
            Ok(stream) => {
                running.push(Some((stream, Vec::with_capacity(call.texts.len()))));
                results.push(None);
            }
            Err(e) => {
                running.push(None);
                results.push(Some(Err(e)));
            }
        }
    }
    while running.iter().any(Option::is_some) {
        for (slot, result) in running.iter_mut().zip(results.iter_mut()) {
            let Some((stream, vectors)) = slot.as_mut() else { continue };
            // Everything that arrived, then the next call.
            loop {
                match stream.step(false) {
                    Ok(Ok(Some(vector))) => vectors.push(vector),
                    Ok(Ok(None)) => {
                        *result = slot.take().map(|(_, vectors)| Ok(vectors));
                        break;
                    }
                    Ok(Err(())) => break,
                    Err(e) => {
                        *slot = None;
                        *result = Some(Err(e));
                        break;
                    }
                }
            }
        }
        // A shutdown ends the calls still running.
        if let Err(e) = check_interrupts() {
            return results.into_iter().map(|r| r.unwrap_or_else(|| Err(e.clone()))).collect();
        }
    }
    results.into_iter().map(|r| r.expect("every call finished")).collect()
}

/// One text as bulk work, tried alone after its batch failed; failures are returned, not
/// raised. A lost connection is never sent to another server: the text may be what crashes
/// servers, and it now fails alone.
pub fn try_embed_alone(instruction: &str, max_length: usize, text: &str) -> CallResult<Vec<f32>> {
    let texts = [text.to_string()];
    let mut stream = VectorStream::start_resending(WorkClass::Bulk, instruction, max_length, &texts, 0)?;
    // try_next checks the count at the end.
    let vector = stream.try_next()?.ok_or_else(|| stream.wrong_count(0))?;
    match stream.try_next()? {
        None => Ok(vector),
        Some(_) => Err(stream.wrong_count(2)),
    }
}

/// The chunks of each of `texts` as byte ranges, cut by the model server's tokenizer so that each
/// fits `max_tokens` with `instruction` (`nvembed_engine::chunk_spans`). Failures are returned:
/// one the texts' own (the budget, the overlap, a text too long) blames them. The texts go one
/// `Texts` message at a time, each answered before the next is sent.
pub fn try_chunk(
    instruction: &str,
    max_tokens: usize,
    overlap: usize,
    texts: &[String],
) -> CallResult<Vec<Vec<std::ops::Range<usize>>>> {
    if let Some(text) = texts.iter().find(|t| t.len() > MAX_TEXT_BYTES) {
        return Err(CallError::blaming(
            Blame::Text,
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "nvembed: a text of {} bytes is longer than the {MAX_TEXT_BYTES} bytes nvembed cuts into chunks",
                text.len()
            ),
            "Split the document into several rows before it is chunked.",
        ));
    }
    check_limits(instruction, 1, &[])?;
    let (mut connection, _lease) = open(text_bytes(texts), &mut Vec::new())?;
    connection.send(&ClientMessage::Chunk(ChunkHeader {
        instruction: instruction.to_string(),
        max_tokens,
        overlap,
        count: texts.len(),
    }))?;
    let mut spans: Vec<Vec<std::ops::Range<usize>>> = Vec::with_capacity(texts.len());
    for sent in text_chunks(texts) {
        connection.send(&ClientMessage::Texts(sent.to_vec()))?;
        let answered = spans.len() + sent.len();
        let mut open_text: Vec<std::ops::Range<usize>> = Vec::new();
        while spans.len() < answered {
            match connection.receive()? {
                ServerMessage::Spans { text, spans: more, last } if text == spans.len() as u64 => {
                    let whole = &texts[spans.len()];
                    for (start, end) in more {
                        let (start, end) = (start as usize, end as usize);
                        // Pieces of the text, in order: each starts after the last one's start
                        // and ends no sooner; together they hold the text at most three times
                        // (neighbours share at most half a chunk). A backend cuts texts only
                        // with spans it has checked.
                        let in_order = open_text.last().is_none_or(|last| last.start < start && last.end <= end);
                        let held: usize = open_text.iter().map(|s| s.len()).sum::<usize>() + (end - start.min(end));
                        if !(in_order && start < end && whole.get(start..end).is_some() && held <= 3 * whole.len()) {
                            return Err(connection.named(bad_spans("a chunk that is not a piece of its text")));
                        }
                        open_text.push(start..end);
                    }
                    if last {
                        spans.push(std::mem::take(&mut open_text));
                    }
                }
                ServerMessage::Spans { .. } => return Err(connection.named(bad_spans("chunks of a text out of turn"))),
                ServerMessage::Error {
                    kind: ErrorKind::InvalidInput,
                    message,
                } => {
                    return Err(CallError::blaming(
                        Blame::Text,
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("nvembed: {message}"),
                        "A chunk's max_tokens counts the instruction, <s> and </s> too, and its overlap may be at most half \
                         of the tokens of text left.",
                    ))
                }
                ServerMessage::Error { kind, message } => return Err(connection.failed(kind, message)),
                other => return Err(connection.named(protocol_violation(&other))),
            }
        }
    }
    match connection.receive()? {
        ServerMessage::Done => Ok(spans),
        ServerMessage::Error { kind, message } => Err(connection.failed(kind, message)),
        other => Err(connection.named(protocol_violation(&other))),
    }
}

fn bad_spans(what: &str) -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
        format!("nvembed model server sent {what}"),
        "See the server log.",
    )
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
    /// `nvembed.servers`: remote servers serve the pinned model, which `model` names.
    servers: String,
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
        servers: gucs::servers(),
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

/// The local model server's status, or None when it is not running (or is being restarted).
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

/// A remote server's status (asked with this cluster's token, whatever model it serves).
pub fn remote_status(remote: &Remote) -> CallResult<Status> {
    let (mut connection, _) = Connection::open_remote(remote)?;
    connection.send(&ClientMessage::Status)?;
    match connection.receive()? {
        ServerMessage::Status(status) => Ok(status),
        ServerMessage::Error { kind, message } => Err(connection.failed(kind, message)),
        other => Err(connection.named(protocol_violation(&other))),
    }
}
