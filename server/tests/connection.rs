//! The model server's connections under pressure and abuse, over a real Unix socket with the
//! tiny fixture: connection limits (in all, per role), oversized calls refused before the rest
//! of their texts is read, a hang-up stopping the tokenizer, frame and handshake limits, and
//! accept failures (out of descriptors) that neither spin nor stop the clients already served.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nvembed_engine::{chunk_spans, InputEncoder, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION};
use nvembed_protocol::{
    read_frame, text_chunks, ChunkHeader, ClientMessage, EmbedHeader, ErrorKind, Identity, ServerMessage, Status,
    WorkClass, BUILD_ID,
};
use nvembed_server::connection::serve;
use nvembed_server::limits::{Limits, IDLE_TIMEOUT};

mod common;
use common::{fixture, server_of};

/// A server in this process on a fresh socket; it runs until the test process ends.
fn start(limits: Limits) -> (PathBuf, tempfile::TempDir) {
    start_of(&fixture(), limits)
}

/// As `start`, of the checkpoint in `model`.
fn start_of(model: &Path, limits: Limits) -> (PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let server = server_of(model, limits);
    let path = socket.clone();
    std::thread::spawn(move || serve(&path, server));
    let started = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(started.elapsed() < Duration::from_secs(5), "the server did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    (socket, dir)
}

fn limits(max_connections: usize) -> Limits {
    Limits {
        max_connections,
        handshake_timeout: Duration::from_secs(1),
        idle_timeout: IDLE_TIMEOUT,
    }
}

fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

fn receive(stream: &mut UnixStream) -> std::io::Result<ServerMessage> {
    ServerMessage::decode(read_frame(stream)?)
}

fn hello(stream: &mut UnixStream) {
    ClientMessage::Hello { build: BUILD_ID.into() }.write(stream).unwrap();
    assert_eq!(receive(stream).unwrap(), ServerMessage::Hello { build: BUILD_ID.into() });
}

/// A connection that passed the handshake and asked to be admitted as `role`; the answer.
fn identify(socket: &Path, role: &str, role_connections: Option<usize>) -> (UnixStream, ServerMessage) {
    let mut stream = connect(socket);
    hello(&mut stream);
    ClientMessage::Identify(Identity {
        role: role.into(),
        role_connections,
        token: None,
    })
    .write(&mut stream)
    .unwrap();
    let answer = receive(&mut stream).unwrap();
    (stream, answer)
}

fn admitted(socket: &Path, role: &str, role_connections: Option<usize>) -> UnixStream {
    let (stream, answer) = identify(socket, role, role_connections);
    assert!(matches!(answer, ServerMessage::Ready { .. }), "{answer:?}");
    stream
}

fn status(socket: &Path) -> Status {
    let mut stream = connect(socket);
    hello(&mut stream);
    ClientMessage::Status.write(&mut stream).unwrap();
    match receive(&mut stream).unwrap() {
        ServerMessage::Status(status) => status,
        other => panic!("{other:?}"),
    }
}

fn refused(answer: ServerMessage) -> (ErrorKind, String) {
    match answer {
        ServerMessage::Error { kind, message } => (kind, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn header(count: usize, max_length: usize, max_request_tokens: usize) -> EmbedHeader {
    EmbedHeader {
        class: WorkClass::Bulk,
        instruction: PASSAGE_INSTRUCTION.into(),
        max_length,
        max_request_tokens,
        count,
    }
}

fn long_text(words: usize) -> String {
    (0..words).map(|i| format!("lighthouse{} ", i % 97)).collect()
}

/// Whether the server closed the connection (EOF or reset) within `within`.
fn closed_within(stream: &mut UnixStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// The spans of a chunking call's texts, one list per text, or the server's refusal. Like a
/// backend, it sends one `Texts` message at a time and reads its answers before the next.
fn chunk_call(stream: &mut UnixStream, header: ChunkHeader, texts: &[String]) -> Result<Vec<Vec<(u64, u64)>>, (ErrorKind, String)> {
    let count = header.count;
    ClientMessage::Chunk(header).write(stream).unwrap();
    let mut spans: Vec<Vec<(u64, u64)>> = vec![Vec::new(); count];
    let mut done = 0;
    for chunk in text_chunks(texts) {
        if ClientMessage::Texts(chunk.to_vec()).write(stream).is_err() {
            break;
        }
        let answered = done + chunk.len();
        while done < answered {
            match receive(stream).unwrap() {
                ServerMessage::Spans { text, spans: more, last } => {
                    assert_eq!(text as usize, done, "spans of another text than the open one");
                    spans[done].extend(more);
                    done += usize::from(last);
                }
                other => return Err(refused(other)),
            }
        }
    }
    match receive(stream).unwrap() {
        ServerMessage::Done => {
            assert_eq!(done, count, "every text's last message came");
            Ok(spans)
        }
        other => Err(refused(other)),
    }
}

#[test]
fn a_chunking_call_answers_the_engine_s_chunks_in_order_and_bad_budgets_are_refused() {
    let (socket, _dir) = start(limits(4));
    let encoder = InputEncoder::from_file(&fixture().join("tokenizer.json")).unwrap();
    let mut stream = admitted(&socket, "app", None);
    let texts = vec![
        long_text(3000),
        String::new(),
        "Short.".to_string(),
        "Paragraph one.\n\nParagraph two is here. ".repeat(50),
    ];
    for (instruction, max_tokens, overlap) in [(PASSAGE_INSTRUCTION, 64, 8), (QUERY_INSTRUCTION, 128, 0)] {
        let header = ChunkHeader {
            instruction: instruction.into(),
            max_tokens,
            overlap,
            count: texts.len(),
        };
        let got = chunk_call(&mut stream, header, &texts).unwrap();
        for (text, spans) in texts.iter().zip(&got) {
            let expected = chunk_spans(&encoder, instruction, text, max_tokens, overlap, &|| false).unwrap();
            let expected: Vec<(u64, u64)> = expected.into_iter().map(|s| (s.start as u64, s.end as u64)).collect();
            assert_eq!(spans, &expected);
        }
        assert!(got[0].len() > 10 && got[1].is_empty() && got[2] == [(0, 6)], "{got:?}");
    }
    // Several frames of texts, each answered before the next is read; many small chunks.
    let many: Vec<String> = (0..250).map(|i| long_text(1200 + i)).collect();
    assert!(text_chunks(&many).count() >= 3);
    let header = ChunkHeader {
        instruction: String::new(),
        max_tokens: 20,
        overlap: 2,
        count: many.len(),
    };
    let got = chunk_call(&mut stream, header, &many).unwrap();
    for (text, spans) in many.iter().zip(&got).step_by(57) {
        let expected = chunk_spans(&encoder, "", text, 20, 2, &|| false).unwrap();
        assert_eq!(spans, &expected.into_iter().map(|s| (s.start as u64, s.end as u64)).collect::<Vec<_>>());
    }
    assert!(got.iter().map(Vec::len).sum::<usize>() > 100_000);
    // The connection goes on after a call; a budget the query instruction fills is refused.
    let header = ChunkHeader {
        instruction: QUERY_INSTRUCTION.into(),
        max_tokens: 5,
        overlap: 0,
        count: 1,
    };
    let (kind, message) = chunk_call(&mut stream, header, &texts[..1]).unwrap_err();
    assert_eq!(kind, ErrorKind::InvalidInput);
    assert!(message.contains("has no room for text"), "{message}");
    let mut stream = admitted(&socket, "app", None);
    let header = ChunkHeader {
        instruction: String::new(),
        max_tokens: 40,
        overlap: 20,
        count: 1,
    };
    let (kind, message) = chunk_call(&mut stream, header, &texts[..1]).unwrap_err();
    assert_eq!(kind, ErrorKind::InvalidInput);
    assert!(message.contains("an overlap of 20 tokens is more than half of the 38 tokens"), "{message}");
    // Before admission, a chunking call is out of turn.
    let mut stream = connect(&socket);
    hello(&mut stream);
    ClientMessage::Chunk(ChunkHeader {
        instruction: String::new(),
        max_tokens: 16,
        overlap: 0,
        count: 1,
    })
    .write(&mut stream)
    .unwrap();
    assert!(closed_within(&mut stream, Duration::from_secs(5)));
}

#[test]
fn connections_are_limited_in_all_and_per_role_and_status_still_answers() {
    let (socket, _dir) = start(limits(4));
    // A role without its own setting gets a quarter of the server's connections: one here.
    let first = admitted(&socket, "app", None);
    let (kind, message) = refused(identify(&socket, "app", None).1);
    assert_eq!(kind, ErrorKind::Busy);
    assert_eq!(
        message,
        "role \"app\" already holds 1 model server connections, its limit (nvembed.max_calls_per_role = -1: 1/4 of the server's 4)"
    );
    // A role given more by its own setting, up to the server's limit.
    let loader: Vec<UnixStream> = (0..3).map(|_| admitted(&socket, "loader", Some(10))).collect();
    let (kind, message) = refused(identify(&socket, "other", Some(10)).1);
    assert_eq!(kind, ErrorKind::Busy);
    assert_eq!(message, "the model server already serves its limit of 4 connections");
    let seen = status(&socket);
    assert_eq!((seen.connections, seen.refused_connections), (4, 2));
    // A connection that leaves makes room.
    drop(first);
    let started = Instant::now();
    while status(&socket).connections > 3 {
        assert!(started.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(10));
    }
    admitted(&socket, "other", Some(10));
    drop(loader);
}

#[test]
fn an_oversized_call_is_refused_before_the_rest_of_its_texts_is_read() {
    let (socket, _dir) = start(limits(16));
    // Its count alone is too many tokens: refused before any text.
    let mut stream = admitted(&socket, "app", None);
    ClientMessage::Embed(header(1_000_000_000_000, 512, 1 << 18)).write(&mut stream).unwrap();
    let (kind, message) = refused(receive(&mut stream).unwrap());
    assert_eq!(kind, ErrorKind::TooLarge);
    assert_eq!(
        message,
        "the call submits at least 2000000000000 tokens in 1000000000000 texts, more than nvembed.max_request_tokens (262144)"
    );
    assert!(closed_within(&mut stream, Duration::from_secs(2)));

    // An instruction past its limit, and one that leaves nothing to pool: refused before any
    // text is read.
    for (instruction, max_length, kind, message) in [
        ("i".repeat(40 << 10), 512, ErrorKind::TooLarge, "an instruction of 40960 bytes is longer than the 32768 bytes"),
        ("Instruct: a long task ".repeat(40), 16, ErrorKind::InvalidInput, "nothing left to pool in input 0"),
    ] {
        let mut stream = admitted(&socket, "app", None);
        let mut call = header(3, max_length, 1 << 18);
        call.instruction = instruction;
        ClientMessage::Embed(call).write(&mut stream).unwrap();
        let (got_kind, got) = refused(receive(&mut stream).unwrap());
        assert_eq!(got_kind, kind);
        assert!(got.contains(message), "{got}");
        assert!(closed_within(&mut stream, Duration::from_secs(2)));
    }

    // 50 texts truncated at 512 tokens, at most 600 tokens: the first text already decides.
    let mut stream = admitted(&socket, "app", None);
    let texts: Vec<String> = (0..50).map(|_| long_text(2000)).collect();
    ClientMessage::Embed(header(texts.len(), 512, 600)).write(&mut stream).unwrap();
    ClientMessage::Texts(texts[..1].to_vec()).write(&mut stream).unwrap();
    let (kind, message) = refused(receive(&mut stream).expect("refused while 49 texts are still to come"));
    assert_eq!(kind, ErrorKind::TooLarge);
    assert_eq!(
        message,
        "the call submits at least 610 tokens in 50 texts, more than nvembed.max_request_tokens (600)"
    );
    assert!(closed_within(&mut stream, Duration::from_secs(2)), "the rest of the call would be read");
}

#[test]
fn a_model_that_cannot_be_loaded_refuses_calls_and_status_says_why() {
    let missing = tempfile::tempdir().unwrap();
    // A directory with no checkpoint in it.
    let (socket, _dir) = start_of(missing.path(), limits(8));
    let before = status(&socket);
    assert_eq!((before.loaded, before.load_error), (false, None), "nothing tried yet");
    let mut stream = admitted(&socket, "app", None);
    ClientMessage::Embed(header(1, 512, 1 << 18)).write(&mut stream).unwrap();
    let (kind, message) = refused(receive(&mut stream).unwrap());
    assert_eq!(kind, ErrorKind::Load);
    assert!(message.contains(&*missing.path().to_string_lossy()), "{message}");
    let after = status(&socket);
    assert!(!after.loaded);
    assert_eq!(after.load_error.as_deref(), Some(message.as_str()));
}

#[test]
fn a_client_that_hangs_up_while_its_texts_are_tokenized_stops_the_tokenizer() {
    let (socket, _dir) = start(limits(16));
    let mut stream = admitted(&socket, "app", None);
    // 40 texts of ~1 MB: tens of seconds of tokenizing in all.
    let texts: Vec<String> = (0..40).map(|_| long_text(100_000)).collect();
    ClientMessage::Embed(header(texts.len(), 32_768, usize::MAX)).write(&mut stream).unwrap();
    let mut sender = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        for chunk in text_chunks(&texts) {
            if ClientMessage::Texts(chunk.to_vec()).write(&mut sender).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(&socket).connections, 1);
    // A cancelled statement: the backend closes its connection.
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    let hung_up = Instant::now();
    while status(&socket).connections > 0 {
        assert!(
            hung_up.elapsed() < Duration::from_secs(3),
            "the server went on reading and tokenizing a call whose client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sending.join().unwrap();
}

#[test]
fn frames_past_their_limit_and_silent_handshakes_are_dropped_without_buffering() {
    let (socket, _dir) = start(limits(16));
    // A handshake announcing 32 MiB: dropped at once, nothing allocated for it.
    let mut stream = connect(&socket);
    stream.write_all(&((32u32 << 20).to_be_bytes())).unwrap();
    stream.write_all(&[1]).unwrap();
    assert!(closed_within(&mut stream, Duration::from_secs(1)));
    // An admitted client's call header may not be a frame of texts' size either.
    let mut stream = admitted(&socket, "app", None);
    stream.write_all(&((1u32 << 20).to_be_bytes())).unwrap();
    stream.write_all(&[3]).unwrap();
    assert!(closed_within(&mut stream, Duration::from_secs(1)));
    // A length past any frame's limit.
    let mut stream = admitted(&socket, "app", None);
    stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(closed_within(&mut stream, Duration::from_secs(1)));
    // A connection that never says hello is closed after the handshake timeout (1 s here).
    let mut silent = connect(&socket);
    let opened = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(3)));
    assert!(opened.elapsed() >= Duration::from_millis(900));
    // One that drips its hello a byte at a time has the same second in all.
    let mut dripping = connect(&socket);
    let mut hello = Vec::new();
    ClientMessage::Hello { build: BUILD_ID.into() }.write(&mut hello).unwrap();
    let opened = Instant::now();
    for byte in &hello {
        if dripping.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if opened.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    assert!(closed_within(&mut dripping, Duration::from_millis(100)));
    assert!(opened.elapsed() < Duration::from_secs(3), "a dripping handshake was kept {:?}", opened.elapsed());
    // Meanwhile the server serves.
    assert_eq!(status(&socket).connections, 0);
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn out_of_descriptors_the_server_pauses_accepting_and_serves_its_clients() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_nvembed-model-server"));
    command
        .args(["--socket", socket.to_str().unwrap(), "--dtype", "f32", "--threads", "1", "--preload"])
        .args(["--model", fixture().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only setrlimit between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = Killed(command.spawn().unwrap());
    let started = Instant::now();
    while !status_answers(&socket) || !status(&socket).loaded {
        assert!(started.elapsed() < Duration::from_secs(10), "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A client admitted before the flood.
    let mut client = admitted(&socket, "app", Some(1));
    // Connections that never say hello, past the descriptors the server has.
    let flood: Vec<UnixStream> = (0..100).filter_map(|_| UnixStream::connect(&socket).ok()).collect();
    assert!(flood.len() > 48, "only {} connections queued", flood.len());
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(server.0.id());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_seconds(server.0.id()) - before;
    eprintln!("out of descriptors with {} connections queued: {spent:.2} CPU seconds in 2 s", flood.len());
    assert!(spent < 0.5, "the server spent {spent:.2} CPU seconds in 2 s while out of descriptors");
    // The admitted client is still served.
    let texts = vec!["a lighthouse".to_string(), "a harbour".to_string()];
    ClientMessage::Embed(header(2, 512, 1 << 18)).write(&mut client).unwrap();
    ClientMessage::Texts(texts).write(&mut client).unwrap();
    let mut vectors = 0;
    loop {
        match receive(&mut client).unwrap() {
            ServerMessage::Vectors { dimension, values } => vectors += values.len() / dimension,
            ServerMessage::Done => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(vectors, 2);
    drop(flood);
    // New connections are accepted again once descriptors are free.
    let started = Instant::now();
    while !status_answers(&socket) {
        assert!(started.elapsed() < Duration::from_secs(10), "the server did not accept again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.0.try_wait().unwrap().is_none(), "the server exited");
    server.0.kill().unwrap();
    let mut log = String::new();
    server.0.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("cannot accept a connection (Too many open files"), "{log}");
    assert!(log.contains("pausing new connections"), "{log}");
    // Logged once per burst, not once per attempt.
    assert!(log.matches("cannot accept").count() <= 2, "{log}");
}

fn status_answers(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut request = Vec::new();
    ClientMessage::Hello { build: BUILD_ID.into() }.write(&mut request).unwrap();
    ClientMessage::Status.write(&mut request).unwrap();
    stream.write_all(&request).is_ok()
        && matches!(receive(&mut stream), Ok(ServerMessage::Hello { .. })) && matches!(receive(&mut stream), Ok(ServerMessage::Status(_)))
}

#[test]
fn a_client_that_stops_reading_gets_at_most_two_passes_computed_ahead() {
    let (socket, _dir) = start(limits(16));
    let mut stream = admitted(&socket, "app", None);
    let texts: Vec<String> = (0..20_000).map(|i| format!("passage number {i}")).collect();
    ClientMessage::Embed(header(texts.len(), 512, 1 << 18)).write(&mut stream).unwrap();
    for chunk in text_chunks(&texts) {
        ClientMessage::Texts(chunk.to_vec()).write(&mut stream).unwrap();
    }
    let first = match receive(&mut stream).unwrap() {
        ServerMessage::Vectors { dimension, values } => values.len() / dimension,
        other => panic!("{other:?}"),
    };
    let mut tokens = status(&socket).tokens;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = status(&socket).tokens;
        if now == tokens {
            break;
        }
        tokens = now;
    }
    eprintln!("first frame {first} rows, {tokens} tokens computed");
    assert!(tokens <= 2 * 16_384, "{tokens} tokens computed for a client that read {first} rows");
}
