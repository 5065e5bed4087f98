//! One client connection: the build handshake, then status or embedding calls. An embedding
//! call's texts are admitted (tokenized and measured) here, in the connection's thread, then
//! handed to the scheduler; its vectors are written back in input order, in bounded chunks, as
//! the scheduler delivers them. A client that hangs up (a cancelled or timed-out query, a
//! reset connection) cancels its call within `HANGUP_POLL`.

use std::collections::BTreeMap;
use std::io::ErrorKind as IoErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use nvembed_protocol::{
    read_frame, vectors_per_chunk, ClientMessage, EmbedHeader, ErrorKind, ServerMessage, Status, BUILD_ID,
};

use nvembed_engine::dtype_name;

use crate::admission::admit;
use crate::model::ModelSlot;
use crate::scheduler::{Event, Scheduler};
use crate::stats::Stats;

/// How often a connection waiting for results checks whether its client hung up.
const HANGUP_POLL: Duration = Duration::from_millis(50);

pub struct Server {
    pub model: ModelSlot,
    pub scheduler: Arc<Scheduler>,
    pub stats: Arc<Stats>,
    /// How many times the supervisor has restarted the server (reported in status).
    pub restarts: u64,
}

impl Server {
    fn status(&self) -> Status {
        let loaded = self.model.loaded();
        let settings = self.model.settings();
        Status {
            loaded: loaded.is_some(),
            model: settings.model.clone(),
            // What `auto` chose, once the model is loaded.
            dtype: loaded.as_ref().map_or_else(|| settings.dtype.clone(), |m| dtype_name(m.dtype()).to_string()),
            device: settings.device.clone(),
            dimension: loaded.as_ref().map(|m| m.embedding_dim()),
            load_seconds: loaded.as_ref().map(|m| m.load_seconds()),
            requests: Stats::get(&self.stats.requests),
            tokens: Stats::get(&self.stats.tokens),
            waiting: Stats::get(&self.stats.waiting),
            active_rows: Stats::get(&self.stats.active_rows),
            cancelled_rows: Stats::get(&self.stats.cancelled_rows),
            restarts: self.restarts,
            pid: std::process::id(),
        }
    }
}

/// Whether the peer is gone: it closed its end (a cancelled backend drops its connection) or
/// the connection was reset.
fn hung_up(stream: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: peeking one byte into a valid buffer on an open socket.
    let n = unsafe {
        libc::recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(std::io::Error::last_os_error().kind(), IoErrorKind::WouldBlock | IoErrorKind::Interrupted),
    }
}

fn read_message(stream: &mut UnixStream) -> Option<ClientMessage> {
    let frame = read_frame(stream).ok()?;
    match ClientMessage::decode(frame) {
        Ok(message) => Some(message),
        Err(e) => {
            eprintln!("nvembed-model-server: dropping a connection: {e}");
            None
        }
    }
}

/// Serves one client until it hangs up or breaks the protocol.
pub fn serve_client(mut stream: UnixStream, server: &Server) {
    match read_message(&mut stream) {
        Some(ClientMessage::Hello { build }) => {
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
            eprintln!("nvembed-model-server: dropping a connection that did not start with a handshake");
            return;
        }
        None => return,
    }
    loop {
        let served = match read_message(&mut stream) {
            Some(ClientMessage::Status) => ServerMessage::Status(server.status()).write(&mut stream).is_ok(),
            Some(ClientMessage::Embed(header)) => embed(&mut stream, server, header),
            Some(other) => {
                eprintln!("nvembed-model-server: dropping a connection that sent {other:?} out of turn");
                false
            }
            None => false,
        };
        if !served {
            return;
        }
    }
}

/// Answers one embedding call; false when the connection cannot go on.
fn embed(stream: &mut UnixStream, server: &Server, header: EmbedHeader) -> bool {
    let mut texts = Vec::with_capacity(header.count.min(1 << 20));
    while texts.len() < header.count {
        match read_message(stream) {
            Some(ClientMessage::Texts(chunk)) if texts.len() + chunk.len() <= header.count => texts.extend(chunk),
            _ => return false,
        }
    }
    let error = |stream: &mut UnixStream, kind: ErrorKind, message: String| {
        // The caller's HINT for these says "see the server log" (load errors are logged where
        // the load fails; oversized or unpoolable inputs are the caller's own).
        if matches!(kind, ErrorKind::Internal | ErrorKind::NonFinite) {
            eprintln!("nvembed-model-server: {message}");
        }
        ServerMessage::Error { kind, message }.write(stream).is_ok()
    };
    let model = match server.model.get(|| hung_up(stream)) {
        Ok(Some(model)) => model,
        Ok(None) => return false,
        Err(message) => return error(stream, ErrorKind::Load, message),
    };
    let inputs = match admit(&model, &header, &texts) {
        Ok(inputs) => inputs,
        Err((kind, message)) => return error(stream, kind, message),
    };
    drop(texts);
    let count = inputs.len();
    let dimension = model.embedding_dim();
    let chunk_rows = vectors_per_chunk(dimension);
    Stats::add(&server.stats.waiting, 1);
    let handle = server.scheduler.submit(header.class, inputs, model);
    let mut finished: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut written = 0;
    let outcome = loop {
        if written == count {
            Stats::add(&server.stats.requests, 1);
            break ServerMessage::Done.write(stream).is_ok();
        }
        let event = match handle.events.recv_timeout(HANGUP_POLL) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) if hung_up(stream) => break false,
            Err(RecvTimeoutError::Timeout) => continue,
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
            handle.set_written(written);
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

/// Listens on `socket` (replacing a stale socket file, private to this OS user) and serves
/// every client in its own thread, the model in the scheduler's; runs until the process ends.
pub fn serve(socket: &Path, server: Arc<Server>) -> std::io::Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == IoErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    let scheduler = server.scheduler.clone();
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || scheduler.run())?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let server = server.clone();
        std::thread::spawn(move || serve_client(stream, &server));
    }
    Ok(())
}
