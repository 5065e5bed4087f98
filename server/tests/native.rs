//! The native protocol on the network (`--listen`): TLS over TCP, a token in the handshake,
//! the model announced on admission, and the server's own ceiling on a call's size, against
//! an in-process server of the tiny fixture that also serves its Unix socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvembed_engine::PASSAGE_INSTRUCTION;
use nvembed_protocol::{
    read_frame, ClientMessage, EmbedHeader, ErrorKind, Identity, ServerMessage, WorkClass, BUILD_ID,
};
use nvembed_server::connection::{serve, Access, Server};
use nvembed_server::limits::{Limits, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use nvembed_server::native::serve_tls;
use nvembed_server::stats::Stats;
use nvembed_server::tokens::Tokens;

mod common;
use common::{localhost_certificate, tiny_server, SERVED_NAME};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
/// The server's ceiling on a network call's tokens.
const CEILING: usize = 300;

struct Running {
    server: Arc<Server>,
    port: u16,
    socket: PathBuf,
    client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, roots) = localhost_certificate(dir.path());
    let tokens_file = dir.path().join("tokens");
    std::fs::write(&tokens_file, format!("cluster-a {TOKEN}\n")).unwrap();
    let server = tiny_server(Limits {
        max_connections: 16,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
    });
    server.model.get(|| false).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = nvembed_server::tls::server_config(&cert, &key, &[]).unwrap();
    let access = Access::Network {
        tokens: Some(Arc::new(Tokens::load(&tokens_file).unwrap())),
        max_request_tokens: CEILING,
    };
    let tcp_server = server.clone();
    std::thread::spawn(move || serve_tls(listener, tls, tcp_server, access));
    let socket = dir.path().join("s.sock");
    let (path, unix_server) = (socket.clone(), server.clone());
    std::thread::spawn(move || serve(&path, unix_server));
    let started = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(started.elapsed() < Duration::from_secs(5), "the server did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Running {
        server,
        port,
        socket,
        client: Arc::new(client),
        _dir: dir,
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls(running: &Running) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", running.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    rustls::StreamOwned::new(rustls::ClientConnection::new(running.client.clone(), name).unwrap(), tcp)
}

fn send(stream: &mut impl Write, message: ClientMessage) {
    let mut frame = Vec::new();
    message.write(&mut frame).unwrap();
    stream.write_all(&frame).unwrap();
    stream.flush().unwrap();
}

fn receive(stream: &mut impl Read) -> ServerMessage {
    ServerMessage::decode(read_frame(stream).unwrap()).unwrap()
}

/// Handshake and identification with `token`; the server's answer.
fn identify(stream: &mut (impl Read + Write), token: Option<&str>) -> ServerMessage {
    send(stream, ClientMessage::Hello { build: BUILD_ID.into() });
    assert_eq!(receive(stream), ServerMessage::Hello { build: BUILD_ID.into() });
    send(
        stream,
        ClientMessage::Identify(Identity {
            role: "app".into(),
            role_connections: None,
            token: token.map(String::from),
        }),
    );
    receive(stream)
}

/// One call's vectors, or its error.
fn call(stream: &mut (impl Read + Write), texts: &[String], max_request_tokens: usize) -> Result<Vec<Vec<f32>>, (ErrorKind, String)> {
    send(
        stream,
        ClientMessage::Embed(EmbedHeader {
            class: WorkClass::Bulk,
            instruction: PASSAGE_INSTRUCTION.into(),
            max_length: 512,
            max_request_tokens,
            count: texts.len(),
        }),
    );
    send(stream, ClientMessage::Texts(texts.to_vec()));
    let mut vectors = Vec::new();
    loop {
        match receive(stream) {
            ServerMessage::Vectors { dimension, values } => vectors.extend(values.chunks(dimension).map(<[f32]>::to_vec)),
            ServerMessage::Done => return Ok(vectors),
            ServerMessage::Error { kind, message } => return Err((kind, message)),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_client_with_its_token_gets_over_tls_what_the_socket_gives() {
    let running = start();
    let mut remote = tls(&running);
    let served = match identify(&mut remote, Some(TOKEN)) {
        ServerMessage::Ready { served: Some(served) } => served,
        other => panic!("{other:?}"),
    };
    assert_eq!(served.model, SERVED_NAME);
    assert_eq!((served.dtype.as_str(), served.device.as_str()), ("f32", "cpu"));
    assert!(served.revision.starts_with("sha256:"), "{}", served.revision);
    let texts: Vec<String> = ["a lighthouse on the cliff", "über den Wolken", "二つの塔"].map(String::from).into();
    let over_tls = call(&mut remote, &texts, 10_000).unwrap();
    // A second call on the same connection.
    assert_eq!(call(&mut remote, &texts[..1], 10_000).unwrap()[0], over_tls[0]);
    let mut local = UnixStream::connect(&running.socket).unwrap();
    assert!(matches!(identify(&mut local, None), ServerMessage::Ready { served: Some(_) }));
    let over_socket = call(&mut local, &texts, 10_000).unwrap();
    assert_eq!(over_tls.len(), 3);
    for (a, b) in over_tls.iter().zip(&over_socket) {
        assert_eq!(a.len(), served.dimension);
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn a_wrong_or_missing_token_is_refused_before_any_call() {
    let running = start();
    let requests = Stats::get(&running.server.stats.requests);
    for token in [Some("fedcba9876543210fedcba9876543210"), Some(""), None] {
        let refused = running.server.stats.refused_connections.load(std::sync::atomic::Ordering::SeqCst);
        let mut remote = tls(&running);
        match identify(&mut remote, token) {
            ServerMessage::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Unauthorized);
                assert!(message.contains("does not accept"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The connection ends there: nothing more is read.
        let mut byte = [0u8; 1];
        assert!(matches!(remote.read(&mut byte), Ok(0) | Err(_)));
        assert_eq!(
            running.server.stats.refused_connections.load(std::sync::atomic::Ordering::SeqCst),
            refused + 1
        );
    }
    assert_eq!(Stats::get(&running.server.stats.requests), requests);
    // Nor is the status told to a client that did not identify itself.
    let mut remote = tls(&running);
    send(&mut remote, ClientMessage::Hello { build: BUILD_ID.into() });
    assert_eq!(receive(&mut remote), ServerMessage::Hello { build: BUILD_ID.into() });
    send(&mut remote, ClientMessage::Status);
    let mut byte = [0u8; 1];
    assert!(matches!(remote.read(&mut byte), Ok(0) | Err(_)));
    let mut remote = tls(&running);
    assert!(matches!(identify(&mut remote, Some(TOKEN)), ServerMessage::Ready { .. }));
    send(&mut remote, ClientMessage::Status);
    assert!(matches!(receive(&mut remote), ServerMessage::Status(s) if s.loaded && s.revision.is_some()));
}

#[test]
fn the_servers_ceiling_bounds_what_a_network_call_may_ask() {
    let running = start();
    let texts: Vec<String> = (0..4).map(|i| format!("{} ", i).repeat(150)).collect();
    let mut remote = tls(&running);
    assert!(matches!(identify(&mut remote, Some(TOKEN)), ServerMessage::Ready { .. }));
    // The client asks for a million tokens; the server allows CEILING.
    let (kind, message) = call(&mut remote, &texts, 1_000_000).unwrap_err();
    assert_eq!(kind, ErrorKind::TooLarge);
    assert!(message.contains(&CEILING.to_string()), "{message}");
    // The Unix socket trusts the cluster's own limit.
    let mut local = UnixStream::connect(&running.socket).unwrap();
    assert!(matches!(identify(&mut local, None), ServerMessage::Ready { .. }));
    assert_eq!(call(&mut local, &texts, 1_000_000).unwrap().len(), 4);
}

#[test]
fn a_token_holds_a_quarter_of_the_connections_and_silent_peers_never_crowd_out_others() {
    // max_connections 16: a token's roles together hold 4, whatever role_connections a
    // client asks for.
    let running = start();
    let mut held = Vec::new();
    for n in 0..5 {
        let mut remote = tls(&running);
        send(&mut remote, ClientMessage::Hello { build: BUILD_ID.into() });
        assert_eq!(receive(&mut remote), ServerMessage::Hello { build: BUILD_ID.into() });
        send(
            &mut remote,
            ClientMessage::Identify(Identity {
                role: format!("role{n}"),
                role_connections: Some(1000),
                token: Some(TOKEN.into()),
            }),
        );
        match (n, receive(&mut remote)) {
            (0..4, ServerMessage::Ready { .. }) => held.push(remote),
            (4, ServerMessage::Error { kind, message }) => {
                assert_eq!(kind, ErrorKind::Busy);
                assert!(message.contains("token \"cluster-a\" already holds 4"), "{message}");
            }
            (n, other) => panic!("connection {n}: {other:?}"),
        }
    }
    drop(held);
    // Peers that connect and never start TLS: past one peer's allowance they are closed unread,
    // and the cluster's Unix socket and other hosts are still admitted and served.
    let silent: Vec<TcpStream> = (0..nvembed_server::limits::UNADMITTED_PER_PEER + 8)
        .map(|_| TcpStream::connect(("127.0.0.1", running.port)).unwrap())
        .collect();
    let started = Instant::now();
    let closed_unread = |s: &TcpStream| {
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        matches!((&*s).read(&mut [0u8; 1]), Ok(0))
    };
    while silent.iter().filter(|s| closed_unread(s)).count() < 8 {
        assert!(started.elapsed() < Duration::from_secs(4), "no silent peer past the allowance was closed");
    }
    let mut local = UnixStream::connect(&running.socket).unwrap();
    assert!(matches!(identify(&mut local, None), ServerMessage::Ready { .. }));
    assert_eq!(call(&mut local, &["still served".to_string()], 10_000).unwrap().len(), 1);
    // Another host (127.0.0.2) is admitted and served over the network meanwhile.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into()).unwrap();
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], running.port)).into()).unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut other = rustls::StreamOwned::new(rustls::ClientConnection::new(running.client.clone(), name).unwrap(), tcp);
    assert!(matches!(identify(&mut other, Some(TOKEN)), ServerMessage::Ready { .. }));
    assert_eq!(call(&mut other, &["served too".to_string()], 10_000).unwrap().len(), 1);
}
