//! The embedding entry points and status.
//!
//! The public SQL functions (`sql/functions.sql`) pass texts here as UTF-8 bytes
//! (`convert_to(text, 'UTF8')`), so nvembed gives the same vectors in a database of any encoding;
//! Rust's `&str` would only accept text that is already UTF-8.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use nvembed_protocol::{Status, TASK_INSTRUCTION_PREFIX, TASK_INSTRUCTION_SUFFIX};

use crate::{client, endpoints};

/// `bytes` as a String; an ERROR when they are not UTF-8.
pub(crate) fn utf8(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(e) => crate::call_error::fail(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            format!("nvembed: text is not valid UTF-8: {e}"),
            "Call nvembed_query / nvembed_passage: they convert text from the database encoding.",
        ),
    }
}

/// One text with `instruction`, both UTF-8: interactive work for the model server.
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_embed_utf8(text: &[u8], instruction: &[u8]) -> Vec<f32> {
    client::embed_one(&utf8(instruction), utf8(text))
}

/// Many texts in one call, as bulk work; NULL in, NULL out, one row per input in input order.
/// Rows are produced as the model server streams them, so neither side holds all the vectors.
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_embed_many_utf8(texts: Array<'_, &[u8]>, instruction: &[u8]) -> SetOfIterator<'static, Option<Vec<f32>>> {
    let present: Vec<bool> = texts.iter().map(|t| t.is_some()).collect();
    let strings: Vec<String> = texts.iter().flatten().map(utf8).collect();
    let mut vectors = if strings.is_empty() {
        None
    } else {
        Some(client::embed_many(&utf8(instruction), &strings))
    };
    drop(strings);
    SetOfIterator::new(present.into_iter().map(move |present| {
        if present {
            vectors.as_mut().and_then(Iterator::next)
        } else {
            None
        }
    }))
}

/// The model card's instruction for a custom retrieval task. Bytes in, bytes out: the task is
/// text in the database encoding (Rust's `&str` would refuse anything but UTF-8), and the prefix
/// and suffix are ASCII, which every server encoding spells the same.
#[pg_extern(
    immutable,
    strict,
    parallel_safe,
    sql = r#"CREATE FUNCTION "nvembed_task_instruction"("task" TEXT) RETURNS TEXT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'nvembed_task_instruction_wrapper';"#
)]
fn nvembed_task_instruction(task: &[u8]) -> Vec<u8> {
    [
        TASK_INSTRUCTION_PREFIX.as_bytes(),
        task,
        TASK_INSTRUCTION_SUFFIX.as_bytes(),
    ]
    .concat()
}

/// Whether the calling procedure may COMMIT: it was CALLed outside a transaction block and not
/// from a function (its SPI connection is non-atomic). nvembed_backfill asks before any work.
#[pg_extern(volatile, parallel_unsafe)]
fn nvembed_transaction_control_allowed() -> bool {
    // SAFETY: reads the state of the caller's SPI connection, if any.
    unsafe { pg_sys::SPI_inside_nonatomic_context() }
}

/// The loaded model's vector dimension; NULL while no model is loaded (for validating a column
/// before the first embedding). With remote servers, the first one's that answers.
#[pg_extern(volatile)]
fn nvembed_model_dimension() -> Option<i32> {
    let remotes = endpoints::remotes();
    if remotes.is_empty() {
        return client::status().and_then(|s| s.dimension).map(|d| d as i32);
    }
    remotes
        .iter()
        .find_map(|r| client::remote_status(r).ok().and_then(|s| s.dimension))
        .map(|d| d as i32)
}

/// One row of `nvembed_status()`: server_running, loaded, model, dtype, device, dimension,
/// load_seconds, requests, tokens, rows, waiting, active_rows, cancelled_rows, restarts, pid, server,
/// revision, last_error.
type StatusRow = (
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<f64>,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i32>,
    String,
    Option<String>,
    Option<String>,
);

/// What `server` answered (None: it did not).
fn status_row(server: String, status: Option<Status>, last_error: Option<String>) -> StatusRow {
    match status {
        Some(s) => (
            true,
            s.loaded,
            Some(s.model),
            Some(s.dtype),
            Some(s.device),
            s.dimension.map(|d| d as i32),
            s.load_seconds,
            s.requests as i64,
            s.tokens as i64,
            s.rows as i64,
            s.waiting as i64,
            s.active_rows as i64,
            s.cancelled_rows as i64,
            s.restarts as i64,
            Some(s.pid as i32),
            server,
            s.revision,
            last_error,
        ),
        None => (false, false, None, None, None, None, None, 0, 0, 0, 0, 0, 0, 0, None, server, None, last_error),
    }
}

/// The local server's row (`server` is 'local'), or one row per server of `nvembed.servers`,
/// each asked now; `last_error` is why the server's last attempt to load its model failed
/// (while none is loaded), else for a remote server why it could not be asked, or the last
/// error any session of this cluster met with it.
fn status_rows() -> Vec<StatusRow> {
    let remotes = endpoints::remotes();
    if remotes.is_empty() {
        let status = client::status();
        let load_error = status.as_ref().and_then(|s| s.load_error.clone());
        return vec![status_row("local".into(), status, load_error)];
    }
    remotes
        .iter()
        .map(|remote| match client::remote_status(remote) {
            Ok(status) => {
                // A server that cannot load its model says why; that comes first.
                let last_error = status.load_error.clone().or_else(|| endpoints::last_error(&remote.address));
                status_row(remote.address.clone(), Some(status), last_error)
            }
            // Busy: up and answering, but this cluster's share of it is in use.
            Err(e) if e.code == PgSqlErrorCode::ERRCODE_TOO_MANY_CONNECTIONS => {
                let mut row = status_row(remote.address.clone(), None, Some(e.message));
                row.0 = true;
                row
            }
            // Recorded, but a status poll never takes a server out of rotation: only calls do.
            Err(e) => {
                endpoints::failed(&remote.address, &e.message, false);
                status_row(remote.address.clone(), None, Some(e.message))
            }
        })
        .collect()
}

/// What the model servers are doing, for monitoring. Not granted to PUBLIC (it shows paths and
/// process ids): `sql/status.sql` grants it to pg_monitor.
#[pg_extern(name = "nvembed_status")]
#[allow(clippy::type_complexity)]
fn nvembed_server_status() -> TableIterator<
    'static,
    (
        name!(server_running, bool),
        name!(loaded, bool),
        name!(model, Option<String>),
        name!(dtype, Option<String>),
        name!(device, Option<String>),
        name!(dimension, Option<i32>),
        name!(load_seconds, Option<f64>),
        name!(requests, i64),
        name!(tokens, i64),
        name!(rows, i64),
        name!(waiting, i64),
        name!(active_rows, i64),
        name!(cancelled_rows, i64),
        name!(restarts, i64),
        name!(pid, Option<i32>),
        name!(server, String),
        name!(revision, Option<String>),
        name!(last_error, Option<String>),
    ),
> {
    TableIterator::new(status_rows())
}

/// nvembed 0.1.0's `nvembed_status()`, without active_rows and cancelled_rows: the C symbol
/// 0.1.0's SQL names, so a database still at 0.1.0 (this build installed, ALTER EXTENSION
/// nvembed UPDATE not yet run) reads every column right. Not part of the current SQL.
#[pg_extern(sql = false)]
#[allow(clippy::type_complexity)]
fn nvembed_status() -> TableIterator<
    'static,
    (
        name!(server_running, bool),
        name!(loaded, bool),
        name!(model, Option<String>),
        name!(dtype, Option<String>),
        name!(device, Option<String>),
        name!(dimension, Option<i32>),
        name!(load_seconds, Option<f64>),
        name!(requests, i64),
        name!(tokens, i64),
        name!(waiting, i64),
        name!(restarts, i64),
        name!(pid, Option<i32>),
    ),
> {
    let (
        running,
        loaded,
        model,
        dtype,
        device,
        dimension,
        load_seconds,
        requests,
        tokens,
        _,
        waiting,
        _,
        _,
        restarts,
        pid,
        _,
        _,
        _,
    ) = status_rows().swap_remove(0);
    TableIterator::once((
        running,
        loaded,
        model,
        dtype,
        device,
        dimension,
        load_seconds,
        requests,
        tokens,
        waiting,
        restarts,
        pid,
    ))
}
