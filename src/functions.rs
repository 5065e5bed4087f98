//! The SQL surface: embedding functions and status.

use pgrx::prelude::*;

use crate::{client, gucs};

fn one(instruction: &str, text: &str) -> Vec<f32> {
    client::embed(instruction, vec![text.to_string()], gucs::max_length())
        .pop()
        .expect("one vector per text")
}

/// Embeds the non-NULL texts in one request; NULL in, NULL out, input order kept.
fn many(instruction: &str, texts: Array<'_, &str>) -> SetOfIterator<'static, Option<Vec<f32>>> {
    let texts: Vec<Option<String>> = texts.iter().map(|t| t.map(str::to_string)).collect();
    let present: Vec<String> = texts.iter().flatten().cloned().collect();
    let mut vectors = if present.is_empty() {
        Vec::new()
    } else {
        client::embed(instruction, present, gucs::max_length())
    }
    .into_iter();
    let out: Vec<Option<Vec<f32>>> = texts.iter().map(|t| t.as_ref().and_then(|_| vectors.next())).collect();
    SetOfIterator::new(out)
}

fn task_instruction(task: &str) -> String {
    format!("Instruct: {task}\nQuery: ")
}

/// Embeds a search query with the session's query instruction.
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_query(text: &str) -> Vec<f32> {
    one(&gucs::query_instruction(), text)
}

/// Embeds a search query for a custom retrieval task.
#[pg_extern(name = "nvembed_query", strict, stable, parallel_safe)]
fn nvembed_query_task(text: &str, task: &str) -> Vec<f32> {
    one(&task_instruction(task), text)
}

/// Embeds many passages in one round trip: one row per input, in input order.
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_passages(texts: Array<'_, &str>) -> SetOfIterator<'static, Option<Vec<f32>>> {
    many("", texts)
}

/// Embeds many queries in one round trip: one row per input, in input order.
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_queries(texts: Array<'_, &str>) -> SetOfIterator<'static, Option<Vec<f32>>> {
    many(&gucs::query_instruction(), texts)
}

/// Embeds many queries for a custom task in one round trip.
#[pg_extern(name = "nvembed_queries", strict, stable, parallel_safe)]
fn nvembed_queries_task(texts: Array<'_, &str>, task: &str) -> SetOfIterator<'static, Option<Vec<f32>>> {
    many(&task_instruction(task), texts)
}

/// Embeds a passage (no instruction).
#[pg_extern(strict, stable, parallel_safe)]
fn nvembed_passage(text: &str) -> Vec<f32> {
    one("", text)
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
