//! `nvembed-model-server`: started by the extension's supervisor with the server-wide settings
//! (`nvembed.model`, `.dtype`, `.device`, `.threads`, `.max_batch_tokens`, `.preload`) on a
//! Unix socket, or run by itself on any host with an HTTP listener (`--http-listen`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nvembed_protocol::{DEFAULT_BATCH_TOKENS, DEFAULT_MAX_REQUEST_TOKENS, MAX_LENGTH, SOCKET_NAME};
use nvembed_server::http::{serve_http, HttpSettings, Transport};
use nvembed_server::tokens::Tokens;
use nvembed_server::connection::{serve, Server};
use nvembed_server::limits::{connections_the_descriptors_allow, Limits, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use nvembed_server::model::{ModelSettings, ModelSlot};
use nvembed_server::scheduler::Scheduler;
use nvembed_server::stats::Stats;

#[derive(Parser)]
#[command(
    name = "nvembed-model-server",
    version,
    about = "Serves NV-Embed-v2 embeddings to PostgreSQL (Unix socket) and over HTTP (OpenAI's /v1/embeddings)",
    after_help = "Example, on a GPU host (the key and tokens files readable by this user only):\n  \
        nvembed-model-server --model nvidia/NV-Embed-v2 --device cuda --http-listen 0.0.0.0:8443 \\\n    \
        --tls-cert /etc/nvembed/server.crt --tls-key /etc/nvembed/server.key --tokens-file /etc/nvembed/tokens\n\
        The tokens file holds lines `NAME TOKEN`; SIGHUP re-reads it."
)]
struct Args {
    /// Unix socket to create (a stale file there is replaced). Default: nvembed.sock in the
    /// working directory, unless --http-listen is given.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Serve HTTP (POST /v1/embeddings, GET /health, GET /metrics) on HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    http_listen: Option<String>,
    /// TLS certificate chain (PEM) of the HTTP listener.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the HTTP listener.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTP without TLS (tokens and texts travel in clear: only on a trusted network).
    #[arg(long, conflicts_with = "tls_cert")]
    allow_plaintext: bool,
    /// Bearer tokens the HTTP listener accepts: lines `NAME TOKEN`; SIGHUP re-reads the file.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Accept HTTP requests without a token (only on a trusted network).
    #[arg(long, conflicts_with = "tokens_file")]
    no_tokens: bool,
    /// The `model` name HTTP clients pass (default: --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Truncation limit of HTTP requests, in tokens including <s>.
    #[arg(long, default_value_t = MAX_LENGTH)]
    max_length: usize,
    /// The most tokens one HTTP request may submit (all its texts, after truncation).
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST_TOKENS)]
    max_request_tokens: usize,
    /// Model directory or Hugging Face hub id (`org/name` or `org/name@revision`).
    #[arg(long)]
    model: String,
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

/// The HTTP listener's socket, transport and settings, checked before anything starts.
fn http_listener(args: &Args, address: &str) -> Result<(std::net::TcpListener, Transport, HttpSettings), String> {
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
    let tokens = match (&args.tokens_file, args.no_tokens) {
        (Some(file), false) => Some(Arc::new(Tokens::load(file)?)),
        (None, true) => {
            eprintln!("nvembed-model-server: WARNING: HTTP requests on {address} need no token (--no-tokens)");
            None
        }
        _ => return Err("--http-listen needs --tokens-file, or --no-tokens".into()),
    };
    let listener = std::net::TcpListener::bind(address).map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let settings = HttpSettings {
        served_model_name: args.served_model_name.clone().unwrap_or_else(|| args.model.clone()),
        max_length: args.max_length,
        max_request_tokens: args.max_request_tokens,
        tokens,
    };
    Ok((listener, transport, settings))
}

fn main() -> ExitCode {
    nvembed_server::crash::abort_on_panic();
    // SIGHUP re-reads the tokens file where there is one (the HTTP listener installs that
    // handler); it never ends the server, whose calls would all be lost.
    // SAFETY: setting a signal's disposition before any thread starts.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    let args = Args::parse();
    if let Some(threads) = args.threads {
        if let Err(e) = nvembed_engine::set_compute_threads(threads) {
            return fail(e);
        }
    }
    let http = match args.http_listen.as_deref().map(|address| http_listener(&args, address)) {
        Some(Ok(http)) => Some(http),
        Some(Err(e)) => return fail(e),
        None => None,
    };
    let socket = args
        .socket
        .clone()
        .or_else(|| http.is_none().then(|| PathBuf::from(SOCKET_NAME)));
    let allowed = connections_the_descriptors_allow();
    let max_connections = args.max_connections.unwrap_or(allowed).clamp(1, allowed);
    let stats = Arc::new(Stats::default());
    let server = Arc::new(Server::new(
        ModelSlot::new(ModelSettings {
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
    if args.preload {
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
