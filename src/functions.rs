//! The embedding entry points and status.
//!
//! The public SQL functions (`sql/functions.sql`) pass texts here as UTF-8 bytes
//! (`convert_to(text, 'UTF8')`), so nvembed gives the same vectors in a database of any encoding;
//! Rust's `&str` would only accept text that is already UTF-8.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::{client, gucs};

fn utf8(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(e) => client::fail(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            format!("nvembed: text is not valid UTF-8: {e}"),
            "Call nvembed_query / nvembed_passage: they convert text from the database encoding.",
        ),
    }
}

/// One text with `instruction`, both UTF-8.
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_embed_utf8(text: &[u8], instruction: &[u8]) -> Vec<f32> {
    client::embed(&utf8(instruction), vec![utf8(text)], gucs::max_length())
        .pop()
        .expect("one vector per text")
}

/// Many texts in one request; NULL in, NULL out, one row per input in input order.
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_embed_many_utf8(texts: Array<'_, &[u8]>, instruction: &[u8]) -> SetOfIterator<'static, Option<Vec<f32>>> {
    let texts: Vec<Option<String>> = texts.iter().map(|t| t.map(utf8)).collect();
    let present: Vec<String> = texts.iter().flatten().cloned().collect();
    let mut vectors = if present.is_empty() {
        Vec::new()
    } else {
        client::embed(&utf8(instruction), present, gucs::max_length())
    }
    .into_iter();
    let out: Vec<Option<Vec<f32>>> = texts.iter().map(|t| t.as_ref().and_then(|_| vectors.next())).collect();
    SetOfIterator::new(out)
}

/// What the model process is doing.
#[pg_extern]
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
    let row = match client::status() {
        Some(s) => (
            true,
            s.loaded,
            s.model,
            s.dtype,
            s.device,
            s.dimension.map(|d| d as i32),
            s.load_seconds,
            s.requests as i64,
            s.tokens as i64,
            s.waiting as i64,
            s.restarts as i64,
            Some(s.pid as i32),
        ),
        None => (false, false, None, None, None, None, None, 0, 0, 0, 0, None),
    };
    TableIterator::once(row)
}
