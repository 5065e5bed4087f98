//! The native protocol over the network (`--listen`): TCP, always in TLS, each client
//! admitted by a bearer token in its `Identify` (`Access::Network`). The connection is then
//! served exactly as one on the Unix socket (`connection.rs`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::connection::{serve_client, Access, Peer, Server};
use crate::limits::{Throttled, UNADMITTED_PER_PEER};
use crate::stats::Stats;

/// Bytes of plaintext gathered before they are sealed into TLS records: a frame written in
/// pieces (length, tag, payload) leaves as one record, not three.
const SEAL_BYTES: usize = 16 << 10;

/// One client over TLS.
struct TlsPeer {
    tls: StreamOwned<ServerConnection, TcpStream>,
    unsealed: Vec<u8>,
}

impl Read for TlsPeer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tls.read(buf)
    }
}

impl Write for TlsPeer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.unsealed.extend_from_slice(buf);
        if self.unsealed.len() >= SEAL_BYTES {
            self.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let pending = std::mem::take(&mut self.unsealed);
        self.tls.write_all(&pending)?;
        self.tls.flush()
    }
}

impl Peer for TlsPeer {
    fn socket(&self) -> RawFd {
        self.tls.sock.as_raw_fd()
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.tls.sock.set_read_timeout(timeout)
    }
}

/// After a failed accept, the listener waits this long before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
static ACCEPT_FAILED: Throttled = Throttled::new();
static FULL: Throttled = Throttled::new();

/// Serves the native protocol in TLS on `listener`, each client in its own thread, until the
/// process ends. The TLS handshake is part of the connection's handshake deadline.
pub fn serve_tls(listener: TcpListener, tls: Arc<ServerConfig>, server: Arc<Server>, access: Access) {
    let access = Arc::new(access);
    loop {
        let (stream, address) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                ACCEPT_FAILED.log(|| format!("cannot accept a TCP connection ({e}); pausing new connections"));
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let Some(opened) = server.gate.open_network(&server.limits, address.ip()) else {
            // Closed before TLS: the client sees the connection closed and tries another server.
            Stats::add(&server.stats.refused_connections, 1);
            FULL.log(|| {
                format!(
                    "closing a TCP connection from {} unread: {} connections are open, or {UNADMITTED_PER_PEER} of \
                     that peer or {} in all wait for admission",
                    address.ip(),
                    server.limits.hard_cap(),
                    server.limits.unadmitted_network()
                )
            });
            continue;
        };
        // Frames are written whole; waiting to fill segments would only add latency.
        let _ = stream.set_nodelay(true);
        let tls_connection = match ServerConnection::new(tls.clone()) {
            Ok(c) => c,
            Err(e) => {
                ACCEPT_FAILED.log(|| format!("cannot start TLS: {e}"));
                continue;
            }
        };
        let (server, access) = (server.clone(), access.clone());
        let spawned = std::thread::Builder::new().name("tls connection".into()).spawn(move || {
            let peer = TlsPeer {
                tls: StreamOwned::new(tls_connection, stream),
                unsealed: Vec::new(),
            };
            serve_client(peer, &server, opened, &access, &address.to_string());
        });
        if let Err(e) = spawned {
            ACCEPT_FAILED.log(|| format!("cannot start a thread for a connection ({e}); pausing new connections"));
            std::thread::sleep(ACCEPT_BACKOFF);
        }
    }
}
