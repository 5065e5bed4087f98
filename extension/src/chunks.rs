//! Chunks: long texts cut by the model's own tokenizer (on the model server, local or remote),
//! for `nvembed_chunks` and the chunk vectorizers (`sql/chunks.sql`, `sql/vectorizer.sql`).

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use nvembed_protocol::{DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS};

use crate::call_error::fail;
use crate::functions::utf8;
use crate::{client, gucs};

/// `max_tokens` and `overlap` with NULL taken as the defaults; an ERROR with a hint when out of
/// range. (What the instruction leaves of the length is the model server's to check: only its
/// tokenizer can count the instruction.)
fn checked_settings(max_tokens: Option<i32>, overlap: Option<i32>) -> (usize, usize) {
    let max_tokens = max_tokens.map_or(DEFAULT_CHUNK_TOKENS as i64, i64::from);
    let overlap = overlap.map_or(DEFAULT_CHUNK_OVERLAP as i64, i64::from);
    let limit = gucs::max_length_limit() as i64;
    if max_tokens < 1 || max_tokens > limit {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("nvembed: max_tokens must be between 1 and nvembed.max_length_limit ({limit}), not {max_tokens}"),
            "max_tokens is the length of the model input a chunk makes, the instruction, <s> and </s> included.",
        );
    }
    if overlap < 0 || overlap >= max_tokens {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("nvembed: overlap must be at least 0 and less than max_tokens ({max_tokens}), not {overlap}"),
            "overlap is how many tokens consecutive chunks share, at most half of a chunk's text.",
        );
    }
    (max_tokens as usize, overlap as usize)
}

/// A chunk's length and overlap in tokens as `nvembed_chunks` and chunk vectorizers take them:
/// NULL gives the default.
#[pg_extern(stable, parallel_safe)]
fn nvembed_chunk_settings(
    max_tokens: Option<i32>,
    overlap: Option<i32>,
) -> TableIterator<'static, (name!(max_tokens, i32), name!(overlap, i32))> {
    let (max_tokens, overlap) = checked_settings(max_tokens, overlap);
    TableIterator::once((max_tokens as i32, overlap as i32))
}

/// The chunks of `document` (UTF-8) for embedding with `instruction` (UTF-8; NULL when `kind`
/// is not one), one row per chunk in order, numbered from 1, as UTF-8 pieces of the document.
#[pg_extern(stable, parallel_safe)]
fn nvembed_chunks_utf8(
    document: Option<&[u8]>,
    kind: Option<&str>,
    instruction: Option<&[u8]>,
    max_tokens: Option<i32>,
    overlap: Option<i32>,
) -> TableIterator<'static, (name!(chunk_seq, i32), name!(chunk, Vec<u8>))> {
    let (max_tokens, overlap) = checked_settings(max_tokens, overlap);
    let Some(instruction) = instruction else {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("nvembed_chunks: kind must be 'passage' or 'query', not {}", kind.map_or("NULL".into(), |k| format!("'{k}'"))),
            "'passage' chunks are embedded without an instruction, 'query' ones with nvembed.query_instruction.",
        );
    };
    let Some(document) = document else {
        return TableIterator::new(Vec::new());
    };
    let text = utf8(document);
    let instruction = utf8(instruction);
    let spans = client::try_chunk(&instruction, max_tokens, overlap, std::slice::from_ref(&text))
        .unwrap_or_else(|e| e.raise());
    let rows: Vec<(i32, Vec<u8>)> = spans
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, span)| (i as i32 + 1, text.as_bytes()[span].to_vec()))
        .collect();
    TableIterator::new(rows)
}
