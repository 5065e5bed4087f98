//! The byte streams a call travels on: the cluster's own Unix socket, or TCP in TLS to a
//! remote server (its certificate checked against `nvembed.server_ca_file` or the system's
//! trust store, and against the host name as `nvembed.servers` writes it). Every wait is cut
//! into POLL_INTERVAL slices, so a cancel or statement_timeout interrupts connecting too.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgrx::PgSqlErrorCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::call_error::{check_interrupts, still_waiting, CallError, CallResult};
use crate::endpoints::Remote;

/// How often a waiting backend wakes to check for cancel / statement_timeout.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long connecting to a remote server (TCP and TLS) may take before it counts as down.
pub const REMOTE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to a remote server whose host stops answering is given up after
/// KEEPALIVE_IDLE + KEEPALIVE_PROBES × KEEPALIVE_INTERVAL (25 s) of silence.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

pub enum Stream {
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            // rustls takes no plaintext while the records it sealed wait for a full socket: that
            // is waiting, as a write timeout on the socket is, not a closed connection.
            Stream::Tls(s) => match s.write(buf)? {
                0 if !buf.is_empty() => Err(std::io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            },
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Why a remote server could not be used; each says which server.
fn unreachable(remote: &Remote, what: impl std::fmt::Display) -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        format!("nvembed model server {} is not reachable: {what}", remote.address),
        "Check that nvembed-model-server --listen runs there and that this host can reach it; nvembed_status() shows \
         every server's last error. Calls go to the other servers of nvembed.servers meanwhile.",
    )
}

fn untrusted(remote: &Remote, what: impl std::fmt::Display) -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        format!("nvembed model server {} failed TLS verification: {what}", remote.address),
        "Its certificate must be signed by a CA in nvembed.server_ca_file (or the system's trust store when that is \
         empty) and name the host as nvembed.servers writes it.",
    )
}

/// A superuser-only setting's file as an error names it: the path for a superuser's session,
/// only the setting's name for anyone else (who may not read the setting either). A vectorizer
/// worker embeds outside a transaction and keeps its errors where the table's readers see
/// them (`last_error`): it never shows the path.
fn shown(setting: &str, file: &str) -> String {
    // SAFETY: superuser() may look the role up in the catalog, which needs a transaction.
    if unsafe { pgrx::pg_sys::IsTransactionState() && pgrx::pg_sys::superuser() } {
        format!("{setting} \"{file}\"")
    } else {
        setting.to_string()
    }
}

fn misconfigured(what: String) -> CallError {
    CallError::new(
        PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
        what,
        "Set nvembed.server_token_file and nvembed.server_ca_file in postgresql.conf to files the cluster's OS user \
         can read, then reload.",
    )
}

/// The token this cluster presents, read on each connection (a rotated token is used at once).
pub fn token() -> CallResult<Option<String>> {
    let Some(file) = crate::gucs::server_token_file() else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| misconfigured(format!("nvembed cannot read {}: {e}", shown("nvembed.server_token_file", &file))))?;
    match text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')) {
        Some(token) => Ok(Some(token.to_string())),
        None => Err(misconfigured(format!("{} holds no token", shown("nvembed.server_token_file", &file)))),
    }
}

thread_local! {
    /// The TLS configuration, built once per CA file (and its modification time).
    static TLS: RefCell<Option<((Option<String>, Option<SystemTime>), Arc<ClientConfig>)>> = const { RefCell::new(None) };
}

fn tls_config() -> CallResult<Arc<ClientConfig>> {
    let ca_file = crate::gucs::server_ca_file();
    let modified = ca_file.as_ref().and_then(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok());
    let key = (ca_file.clone(), modified);
    if let Some(config) = TLS.with(|t| t.borrow().as_ref().filter(|(k, _)| *k == key).map(|(_, c)| c.clone())) {
        return Ok(config);
    }
    let mut roots = RootCertStore::empty();
    match &ca_file {
        Some(file) => {
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect())
                .map_err(|e| misconfigured(format!("nvembed cannot read {}: {e}", shown("nvembed.server_ca_file", file))))?;
            if certificates.is_empty() {
                return Err(misconfigured(format!("{} holds no certificate", shown("nvembed.server_ca_file", file))));
            }
            for certificate in certificates {
                roots
                    .add(certificate)
                    .map_err(|e| misconfigured(format!("{}: {e}", shown("nvembed.server_ca_file", file))))?;
            }
        }
        None => {
            // The system's store; certificates it cannot parse are skipped, as OpenSSL does.
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| misconfigured(format!("nvembed: TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = Arc::new(config);
    TLS.with(|t| *t.borrow_mut() = Some((key, config.clone())));
    Ok(config)
}

/// Opens a TCP connection to one of `addresses`, waiting at most until `deadline`.
fn connect_tcp(remote: &Remote, addresses: &[SocketAddr], deadline: Instant) -> CallResult<TcpStream> {
    let mut last = None;
    for address in addresses {
        let socket = socket2::Socket::new(socket2::Domain::for_address(*address), socket2::Type::STREAM, None)
            .map_err(|e| unreachable(remote, e))?;
        socket.set_nonblocking(true).map_err(|e| unreachable(remote, e))?;
        // A server host that vanishes (power, a network that drops packets) sends no reset:
        // keepalive probes end the connection, and the call goes to another server.
        socket
            .set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL)
                    .with_retries(KEEPALIVE_PROBES),
            )
            .map_err(|e| unreachable(remote, e))?;
        match socket.connect(&(*address).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                last = Some(e);
                continue;
            }
        }
        // Writable when connected or refused.
        let connected = loop {
            let mut pollfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&socket),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: polling one valid descriptor.
            let ready = unsafe { libc::poll(&mut pollfd, 1, POLL_INTERVAL.as_millis() as i32) };
            if ready > 0 {
                break match socket.take_error() {
                    Ok(None) => Ok(()),
                    Ok(Some(e)) | Err(e) => Err(e),
                };
            }
            check_interrupts()?;
            if Instant::now() >= deadline {
                break Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out"));
            }
        };
        match connected {
            Ok(()) => {
                socket.set_nonblocking(false).map_err(|e| unreachable(remote, e))?;
                let stream: TcpStream = socket.into();
                // Frames are written whole; waiting to fill segments would only add latency.
                stream.set_nodelay(true).map_err(|e| unreachable(remote, e))?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(unreachable(
        remote,
        last.map_or_else(|| "the host name resolves to no address".to_string(), |e| e.to_string()),
    ))
}

/// The addresses of `remote`'s host, waiting at most until `deadline`. The lookup (which may ask
/// a DNS server that does not answer) runs in a thread of its own, so a cancel or
/// statement_timeout is not held up by it; a lookup given up on ends on its own.
fn resolve(remote: &Remote, deadline: Instant) -> CallResult<Vec<SocketAddr>> {
    // An address needs no lookup.
    if let Ok(ip) = remote.host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, remote.port)]);
    }
    let (host, port) = (remote.host.clone(), remote.port);
    let (sender, receiver) = std::sync::mpsc::channel();
    // PostgreSQL's signals (cancel, timeouts, latches) stay with the backend's own thread: the
    // resolver starts with every signal blocked.
    // SAFETY: sets and restores this thread's signal mask with valid sets.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
    }
    let spawned = std::thread::Builder::new().name("nvembed resolver".into()).spawn(move || {
        let _ = sender.send((host.as_str(), port).to_socket_addrs().map(Iterator::collect));
    });
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    spawned.map_err(|e| unreachable(remote, e))?;
    loop {
        match receiver.recv_timeout(POLL_INTERVAL) {
            Ok(resolved) => return resolved.map_err(|e| unreachable(remote, e)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                check_interrupts()?;
                if Instant::now() >= deadline {
                    return Err(unreachable(remote, "resolving the host name timed out"));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(unreachable(remote, "the host name lookup failed"))
            }
        }
    }
}

/// A TLS connection to `remote`, its handshake done and its certificate verified.
pub fn connect_remote(remote: &Remote) -> CallResult<Stream> {
    let config = tls_config()?;
    let name = ServerName::try_from(remote.host.clone())
        .map_err(|e| unreachable(remote, format!("\"{}\" is not a host name: {e}", remote.host)))?;
    let deadline = Instant::now() + REMOTE_CONNECT_TIMEOUT;
    let addresses = resolve(remote, deadline)?;
    let mut tcp = connect_tcp(remote, &addresses, deadline)?;
    tcp.set_read_timeout(Some(POLL_INTERVAL)).map_err(|e| unreachable(remote, e))?;
    tcp.set_write_timeout(Some(POLL_INTERVAL)).map_err(|e| unreachable(remote, e))?;
    let mut tls = ClientConnection::new(config, name).map_err(|e| unreachable(remote, e))?;
    while tls.is_handshaking() {
        match tls.complete_io(&mut tcp) {
            Ok(_) => {}
            Err(e) if still_waiting(&e) => {
                check_interrupts()?;
                if Instant::now() >= deadline {
                    return Err(unreachable(remote, "the TLS handshake timed out"));
                }
            }
            // rustls reports what it refused (an unknown issuer, another host name) as
            // InvalidData with its own error inside.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(untrusted(remote, e)),
            Err(e) => return Err(unreachable(remote, e)),
        }
    }
    Ok(Stream::Tls(Box::new(StreamOwned::new(tls, tcp))))
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn setting_files_are_named_by_their_path_to_superusers_only() {
        let shown = || super::shown("nvembed.server_token_file", "/etc/nvembed/token");
        assert_eq!(shown(), "nvembed.server_token_file \"/etc/nvembed/token\"");
        Spi::run("CREATE ROLE nvembed_path_reader").unwrap();
        Spi::run("SET ROLE nvembed_path_reader").unwrap();
        assert_eq!(shown(), "nvembed.server_token_file");
        Spi::run("RESET ROLE").unwrap();
    }
}
