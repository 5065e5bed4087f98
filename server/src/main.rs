//! `nvembed-model-server`: started by the extension's supervisor with the server-wide settings
//! (`nvembed.model`, `.dtype`, `.device`, `.threads`, `.max_batch_tokens`, `.preload`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nvembed_protocol::{DEFAULT_BATCH_TOKENS, SOCKET_NAME};
use nvembed_server::connection::{serve, Server};
use nvembed_server::limits::{connections_the_descriptors_allow, Limits, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use nvembed_server::model::{ModelSettings, ModelSlot};
use nvembed_server::scheduler::Scheduler;
use nvembed_server::stats::Stats;

#[derive(Parser)]
#[command(
    name = "nvembed-model-server",
    version,
    about = "Serves NV-Embed-v2 embeddings on a Unix socket"
)]
struct Args {
    /// Socket path to create (a stale file there is replaced).
    #[arg(long, default_value = SOCKET_NAME)]
    socket: PathBuf,
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

fn main() -> ExitCode {
    nvembed_server::crash::abort_on_panic();
    let args = Args::parse();
    if let Some(threads) = args.threads {
        if let Err(e) = nvembed_engine::set_compute_threads(threads) {
            eprintln!("nvembed-model-server: {e}");
            return ExitCode::FAILURE;
        }
    }
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
    if args.preload {
        let server = server.clone();
        // A failed preload is logged; the first call then tries again and reports the error.
        std::thread::spawn(move || server.model.get(|| false));
    }
    match serve(&args.socket, server) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvembed-model-server: cannot serve on {}: {e}", args.socket.display());
            ExitCode::FAILURE
        }
    }
}
