//! `nvembed-model-server`: started by the extension's supervisor with the server-wide settings
//! (`nvembed.model`, `.dtype`, `.device`, `.threads`, `.max_batch_tokens`, `.preload`) on a
//! Unix socket, or run by itself on any host with network listeners: the native protocol in
//! TLS for PostgreSQL clusters (`--listen`, the extension's `nvembed.servers`) and HTTP for
//! everything else (`--http-listen`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nvembed_protocol::{DEFAULT_BATCH_TOKENS, DEFAULT_MAX_REQUEST_TOKENS, MAX_LENGTH, SOCKET_NAME};
use nvembed_server::connection::{serve, Access, Server};
use nvembed_server::http::{serve_http, HttpSettings, Transport};
use nvembed_server::native::serve_tls;
use nvembed_server::tokens::Tokens;
use nvembed_server::limits::{connections_the_descriptors_allow, Limits, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use nvembed_server::model::{ModelSettings, ModelSlot};
use nvembed_server::scheduler::Scheduler;
use nvembed_server::stats::Stats;

#[derive(Parser)]
#[command(
    name = "nvembed-model-server",
    version,
    about = "Serves NV-Embed-v2 embeddings to PostgreSQL (a Unix socket, or TLS for remote clusters) and over HTTP (OpenAI's /v1/embeddings)",
    after_help = "Example, on a GPU host (the key and tokens files readable by this user only):\n  \
        nvembed-model-server --model nvidia/NV-Embed-v2 --device cuda --listen 0.0.0.0:7443 --http-listen 0.0.0.0:8443 \\\n    \
        --tls-cert /etc/nvembed/server.crt --tls-key /etc/nvembed/server.key --tokens-file /etc/nvembed/tokens\n\
        The tokens file holds lines `NAME TOKEN`; SIGHUP re-reads it. Clusters name the server in nvembed.servers\n\
        (host:7443), OpenAI clients use https://host:8443/v1."
)]
struct Args {
    /// Unix socket to create (a stale file there is replaced). Default: nvembed.sock in the
    /// working directory, unless --listen or --http-listen is given.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Serve the native protocol in TLS on HOST:PORT, for PostgreSQL clusters whose
    /// nvembed.servers name this server (needs --tls-cert and --tls-key). The model is loaded
    /// before the listener opens, so a cluster sees the server once it can serve.
    #[arg(long, value_name = "HOST:PORT", requires = "tls_cert")]
    listen: Option<String>,
    /// Serve HTTP (POST /v1/embeddings, GET /health, GET /metrics) on HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    http_listen: Option<String>,
    /// TLS certificate chain (PEM, leaf first) of the network listeners.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the network listeners.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTP without TLS (tokens and texts travel in clear: only on a trusted network).
    /// The native listener is always in TLS.
    #[arg(long, conflicts_with = "tls_cert")]
    allow_plaintext: bool,
    /// Bearer tokens the network listeners accept: lines `NAME TOKEN`; SIGHUP re-reads the file.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Accept network clients without a token (only on a trusted network).
    #[arg(long, conflicts_with = "tokens_file")]
    no_tokens: bool,
    /// The `model` name HTTP clients pass (default: --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Truncation limit of HTTP requests, in tokens including <s>.
    #[arg(long, default_value_t = MAX_LENGTH)]
    max_length: usize,
    /// The most tokens one network call may submit (all its texts, after truncation), whatever
    /// a cluster's nvembed.max_request_tokens says.
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST_TOKENS)]
    max_request_tokens: usize,
    /// Model directory or Hugging Face hub id (`org/name` or `org/name@revision`).
    #[arg(long)]
    model: String,
    /// `auto` (the checkpoint's own), `f32`, `f16`, `bf16`, or `int8` (weight-only, quantized at
    /// load; CPU; announced as `int8-bf16` or `int8-f32`, the activations' dtype).
    #[arg(long, default_value = nvembed_protocol::DEFAULT_DTYPE)]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Padded tokens per forward pass at most.
    #[arg(long, default_value_t = DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
    /// Load the model at start instead of on the first call.
    #[arg(long)]
    preload: bool,
    /// Times the supervisor has restarted this server (reported in its status).
    #[arg(long, default_value_t = 0)]
    restarts: u64,
    /// Client connections served at once (default: what the descriptor limit allows, raised to
    /// its hard limit, at most 4096). Status checks are not counted.
    #[arg(long)]
    max_connections: Option<usize>,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("nvembed-model-server: {message}");
    ExitCode::FAILURE
}

/// The tokens of the network listeners, when one is asked for.
fn network_tokens(args: &Args) -> Result<Option<Arc<Tokens>>, String> {
    match (&args.tokens_file, args.no_tokens) {
        (Some(file), false) => Ok(Some(Arc::new(Tokens::load(file)?))),
        (None, true) => {
            eprintln!("nvembed-model-server: WARNING: network clients need no token (--no-tokens)");
            Ok(None)
        }
        _ => Err("--listen and --http-listen need --tokens-file, or --no-tokens".into()),
    }
}

fn bind(address: &str) -> Result<std::net::TcpListener, String> {
    std::net::TcpListener::bind(address).map_err(|e| format!("cannot listen on {address}: {e}"))
}

/// The HTTP listener's socket, transport and settings, checked before anything starts.
fn http_listener(
    args: &Args,
    address: &str,
    tokens: Option<Arc<Tokens>>,
) -> Result<(std::net::TcpListener, Transport, HttpSettings), String> {
    let transport = match (&args.tls_cert, &args.tls_key, args.allow_plaintext) {
        (Some(cert), Some(key), false) => Transport::Tls {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None, true) => {
            eprintln!("nvembed-model-server: WARNING: serving HTTP on {address} without TLS (--allow-plaintext)");
            Transport::Plaintext
        }
        _ => return Err("--http-listen needs --tls-cert and --tls-key, or --allow-plaintext".into()),
    };
    let settings = HttpSettings {
        max_length: args.max_length,
        max_request_tokens: args.max_request_tokens,
        tokens,
    };
    Ok((bind(address)?, transport, settings))
}

/// The native listener's TLS configuration (its socket is bound once the model is loaded).
fn native_tls(args: &Args) -> Result<Arc<rustls::ServerConfig>, String> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Err("--listen needs --tls-cert and --tls-key (the native protocol is always in TLS)".into());
    };
    nvembed_server::tls::server_config(cert, key, &[])
}

fn main() -> ExitCode {
    nvembed_server::crash::abort_on_panic();
    let args = Args::parse();
    if let Some(threads) = args.threads {
        if let Err(e) = nvembed_engine::set_compute_threads(threads) {
            return fail(e);
        }
    }
    let networked = args.listen.is_some() || args.http_listen.is_some();
    let tokens = match networked.then(|| network_tokens(&args)).transpose() {
        Ok(tokens) => tokens.flatten(),
        Err(e) => return fail(e),
    };
    // SIGHUP re-reads the tokens file where there is one; it never ends the server, whose
    // calls would all be lost.
    match &tokens {
        Some(tokens) => {
            if let Err(e) = nvembed_server::tokens::reload_on_sighup(tokens.clone()) {
                return fail(format!("cannot handle SIGHUP: {e}"));
            }
        }
        // SAFETY: setting a signal's disposition before any thread starts.
        None => unsafe {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
        },
    }
    let http = match args.http_listen.as_deref().map(|address| http_listener(&args, address, tokens.clone())) {
        Some(Ok(http)) => Some(http),
        Some(Err(e)) => return fail(e),
        None => None,
    };
    let native = match args.listen.as_deref().map(|address| native_tls(&args).map(|tls| (address, tls))) {
        Some(Ok(native)) => Some(native),
        Some(Err(e)) => return fail(e),
        None => None,
    };
    let socket = args.socket.clone().or_else(|| (!networked).then(|| PathBuf::from(SOCKET_NAME)));
    let allowed = connections_the_descriptors_allow();
    let max_connections = args.max_connections.unwrap_or(allowed).clamp(1, allowed);
    let stats = Arc::new(Stats::default());
    let server = Arc::new(Server::new(
        ModelSlot::new(ModelSettings {
            served_model_name: args.served_model_name.clone().unwrap_or_else(|| args.model.clone()),
            model: args.model,
            dtype: args.dtype,
            device: args.device,
        }),
        Scheduler::new(args.batch_tokens, stats.clone()),
        stats,
        args.restarts,
        Limits {
            max_connections,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        },
    ));
    let scheduler = server.scheduler.clone();
    if let Err(e) = std::thread::Builder::new().name("scheduler".into()).spawn(move || scheduler.run()) {
        return fail(format!("cannot start the scheduler: {e}"));
    }
    if native.is_some() {
        // Clusters spread calls over the servers they reach: one still loading is skipped
        // rather than waited for, and one that cannot load is no server at all.
        if let Err(e) = server.model.get(|| false) {
            return fail(format!("cannot load the model: {e}"));
        }
    } else if args.preload {
        let server = server.clone();
        // A failed preload is logged; the first call then tries again and reports the error.
        std::thread::spawn(move || server.model.get(|| false));
    }
    if let Some(socket) = socket {
        let server = server.clone();
        std::thread::spawn(move || {
            // serve returns only when it cannot serve: the server asked for it is not running.
            if let Err(e) = serve(&socket, server) {
                eprintln!("nvembed-model-server: cannot serve on {}: {e}", socket.display());
                std::process::exit(1);
            }
        });
    }
    if let Some((address, tls)) = native {
        // Bound only now, with the model loaded: a cluster that can connect can be served.
        let listener = match bind(address) {
            Ok(listener) => listener,
            Err(e) => return fail(e),
        };
        let server = server.clone();
        let access = Access::Network {
            tokens: tokens.clone(),
            max_request_tokens: args.max_request_tokens,
        };
        std::thread::spawn(move || serve_tls(listener, tls, server, access));
    }
    let outcome = match http {
        Some((listener, transport, settings)) => serve_http(listener, transport, server, settings).map_err(|e| e.to_string()),
        None => loop {
            std::thread::park();
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
