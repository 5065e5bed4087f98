//! The vectorizer workers: one dynamic background worker per database listed in
//! nvembed.vectorizer_databases drains that database's vectorizer queues (`sql/vectorizer.sql`
//! has the queue's rules). The supervisor starts them, restarts one that exits (with backoff)
//! and stops those whose database leaves the list.
//!
//! A worker's loop: claim a batch (a short transaction), embed it through the model server as
//! bulk work with no transaction open, write it (a second transaction). A failure that is a
//! text's own (nothing left to pool, too long, not finite) is retried text by text, so one bad
//! text never holds back the others; a failure that is the model server's (unreachable, model
//! not loadable) leaves the batch queued and the worker waits, backing off. The table is read
//! and written as the vectorizer's owner, everything else as the worker. A chunk vectorizer's
//! texts are first cut into chunks by the model server; its rows are written as chunks.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::client::{self, BatchCall, Blame, CallError};
use crate::endpoints;

/// How long an idle worker waits before looking at the queues again.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long a worker waits for CREATE EXTENSION nvembed in a database that lacks it.
const NO_EXTENSION_POLL: Duration = Duration::from_secs(1);
/// Backoff of a worker whose model server calls fail, and of restarts of a worker that exits.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting is restarted after FIRST_BACKOFF again.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// How often the supervisor looks again for a listed database that does not exist.
const MISSING_DATABASE_POLL: Duration = Duration::from_secs(5);

/// The supervisor's handles on the vectorizer workers, by database.
#[derive(Default)]
pub struct Workers {
    by_database: BTreeMap<String, Supervised>,
}

struct Supervised {
    worker: Option<DynamicBackgroundWorker>,
    started: Instant,
    backoff: Duration,
    next_start: Instant,
    /// Whether the current exit streak was logged (one line per streak, not per restart).
    exit_logged: bool,
    /// Whether it was logged that the database does not exist (once, until it does).
    missing_logged: bool,
}

impl Supervised {
    fn schedule_restart(&mut self) {
        self.next_start = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

impl Workers {
    /// Starts workers for newly listed databases and stops those of databases no longer listed.
    pub fn configure(&mut self, databases: &[String]) {
        self.by_database.retain(|database, supervised| {
            let keep = databases.contains(database);
            if !keep {
                if let Some(worker) = supervised.worker.take() {
                    log!("nvembed: stopping the vectorizer worker of database \"{database}\"");
                    let _stopping = worker.terminate();
                }
            }
            keep
        });
        for database in databases {
            self.by_database.entry(database.clone()).or_insert_with(|| Supervised {
                worker: None,
                started: Instant::now(),
                backoff: FIRST_BACKOFF,
                next_start: Instant::now(),
                exit_logged: false,
                missing_logged: false,
            });
        }
    }

    /// Notices exited workers and (re)starts those that are due.
    pub fn tick(&mut self) {
        for (database, supervised) in &mut self.by_database {
            if let Some(worker) = &supervised.worker {
                match worker.pid() {
                    Ok(_) | Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted) => continue,
                    Err(_) => {
                        supervised.worker = None;
                        if supervised.started.elapsed() >= STABLE_RUN {
                            supervised.backoff = FIRST_BACKOFF;
                            supervised.exit_logged = false;
                        }
                        if !supervised.exit_logged {
                            warning!(
                                "nvembed: the vectorizer worker of database \"{database}\" exited; restarting it with backoff (see the lines above for why)"
                            );
                            supervised.exit_logged = true;
                        }
                        supervised.schedule_restart();
                    }
                }
            }
            if supervised.worker.is_none() && Instant::now() >= supervised.next_start {
                // A worker for a database that does not exist (misspelt, dropped, renamed)
                // would fail to connect at every restart.
                if !database_exists(database) {
                    if !supervised.missing_logged {
                        warning!(
                            "nvembed: database \"{database}\" listed in nvembed.vectorizer_databases does not exist; its vectorizer worker starts once it does"
                        );
                        supervised.missing_logged = true;
                    }
                    supervised.next_start = Instant::now() + MISSING_DATABASE_POLL;
                    continue;
                }
                supervised.missing_logged = false;
                let started = BackgroundWorkerBuilder::new(&format!("nvembed vectorizer {database}"))
                    .set_type("nvembed vectorizer")
                    .set_library("nvembed")
                    .set_function("nvembed_vectorizer_main")
                    .enable_spi_access()
                    .set_start_time(BgWorkerStartTime::RecoveryFinished)
                    .set_restart_time(None)
                    .set_extra(database)
                    .load_dynamic();
                match started {
                    Ok(worker) => {
                        supervised.worker = Some(worker);
                        supervised.started = Instant::now();
                    }
                    Err(_) => {
                        if !supervised.exit_logged {
                            warning!(
                                "nvembed: cannot start the vectorizer worker of database \"{database}\": no free background worker slot; raise max_worker_processes"
                            );
                            supervised.exit_logged = true;
                        }
                        supervised.schedule_restart();
                    }
                }
            }
        }
    }
}

/// Whether database `name` exists. The supervisor is connected to no database: it can read the
/// shared catalog pg_database, but only by a heap scan (no catalog index is open without a
/// database, so `get_database_oid` fails), as the autovacuum launcher lists databases.
fn database_exists(name: &str) -> bool {
    BackgroundWorker::transaction(|| {
        // SAFETY: a catalog scan inside the transaction BackgroundWorker::transaction opens; the
        // relation and scan are closed before it ends, and each tuple is read while current.
        unsafe {
            let relation = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
            let mut found = false;
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let database = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
                if std::ffi::CStr::from_ptr((*database).datname.data.as_ptr()).to_bytes() == name.as_bytes() {
                    found = true;
                    break;
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            found
        }
    })
}

/// A claimed batch: handed back to the SQL functions unchanged, with the vectors.
struct Batch {
    vectorizer_id: i32,
    /// The role the table is read and written as.
    owner: pg_sys::Oid,
    instruction: String,
    max_length: usize,
    /// A chunk vectorizer's chunk length and overlap, in tokens.
    chunking: Option<(usize, usize)>,
    row_keys: String,
    /// UTF-8, as read: handed back for the check that each row still has its text.
    texts: Vec<Option<Vec<u8>>>,
    /// Why a row could not be read (its text is then None): that row's attempt fails alone.
    read_errors: Vec<Option<String>>,
}

/// What became of one text at the model.
enum Embedded {
    Vector(Vec<f32>),
    /// A chunk vectorizer's text: its chunks (byte ranges of the text) and their vectors.
    Chunks(Vec<(Range<usize>, Vec<f32>)>),
    Failed(String),
}

fn shutting_down() -> bool {
    // SAFETY: a flag set by the SIGTERM handler.
    unsafe { std::ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// What the worker finds in its database before each claim.
enum Surroundings {
    /// Another session is dropping or renaming the database, or copying it as a template.
    StepAside,
    /// The nvembed extension is not installed.
    NoExtension,
    /// The schema of the nvembed extension.
    Extension(String),
}

/// DROP DATABASE, ALTER DATABASE ... RENAME and CREATE DATABASE ... TEMPLATE lock the database
/// (AccessExclusiveLock, or ShareLock for a template) and then wait 5 s for every other session
/// in it to leave; PostgreSQL's own workers are told to. A vectorizer worker leaves when it sees
/// such a lock (it looks between batches and while idle); the supervisor starts it again, and
/// its connection waits for the command to end.
fn look_around() -> Surroundings {
    BackgroundWorker::transaction(|| {
        let wanted = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                            WHERE l.locktype OPERATOR(pg_catalog.=) 'object'
                              AND l.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_database'::pg_catalog.regclass
                              AND l.objid OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                                                  WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
                              AND l.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()
                              AND l.mode OPERATOR(pg_catalog.=) ANY (ARRAY['ShareLock', 'AccessExclusiveLock']))",
        )
        .expect("pg_locks");
        if wanted == Some(true) {
            return Surroundings::StepAside;
        }
        Spi::get_one::<String>(
            "SELECT n.nspname::pg_catalog.text FROM pg_catalog.pg_extension e
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
             WHERE e.extname OPERATOR(pg_catalog.=) 'nvembed'",
        )
        .unwrap_or(None)
        .map_or(Surroundings::NoExtension, Surroundings::Extension)
    })
}

/// Runs `work` as `role` in a security-restricted operation, as maintenance commands run a
/// table owner's code: what it runs (the table's triggers, its row-level security policies)
/// cannot switch back with SET ROLE or RESET ROLE, cannot queue deferred triggers (they would
/// fire at COMMIT, as the worker), cannot create temporary objects, and any setting it changes
/// is undone afterwards (it must not leak into the worker's own queries). An ERROR aborts the
/// transaction, which restores the user and the settings itself.
fn as_role<R>(role: pg_sys::Oid, work: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: plain calls into the backend's user-id and settings state, restored below.
    let settings = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            role,
            context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
        );
        pg_sys::NewGUCNestLevel()
    };
    let result = work();
    // SAFETY: as above.
    unsafe {
        pg_sys::AtEOXact_GUC(false, settings);
        pg_sys::SetUserIdAndSecContext(user, context);
    }
    result
}

/// Claims a batch and reads its texts as the owner (one transaction). A row whose text cannot be
/// read is a failed attempt of that row (at the write); a batch whose owner role is gone, a
/// failed attempt for each of its rows.
fn claim(schema: &str) -> Option<Batch> {
    BackgroundWorker::transaction(|| loop {
        let claimed = Spi::connect(|client| {
            let rows = client
                .select(
                    &format!(
                        "SELECT vectorizer_id, owner, instruction, max_length, row_keys, chunk_tokens, chunk_overlap
                         FROM {schema}.nvembed_vectorizer_claim($1)"
                    ),
                    None,
                    &[crate::gucs::vectorizer_batch_rows().into()],
                )
                .expect("nvembed_vectorizer_claim");
            let row = rows.first();
            let chunk_tokens = row.get::<i32>(6).expect("chunk_tokens");
            let chunk_overlap = row.get::<i32>(7).expect("chunk_overlap");
            Some((
                row.get::<i32>(1).expect("vectorizer_id")?,
                row.get::<pg_sys::Oid>(2).expect("owner")?,
                row.get::<String>(3).expect("instruction")?,
                row.get::<i32>(4).expect("max_length")?,
                row.get::<String>(5).expect("row_keys")?,
                chunk_tokens.zip(chunk_overlap).map(|(tokens, overlap)| (tokens as usize, overlap as usize)),
            ))
        });
        let (vectorizer_id, owner, instruction, max_length, row_keys, chunking) = claimed?;
        let owner_exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) $1)",
            &[owner.into()],
        )
        .expect("pg_roles")
        .unwrap_or(false);
        let read = if owner_exists {
            as_role(owner, || {
                Spi::connect(|client| {
                    let rows = client
                        .select(
                            &format!("SELECT texts, errors FROM {schema}.nvembed_vectorizer_read($1, $2)"),
                            None,
                            &[vectorizer_id.into(), row_keys.as_str().into()],
                        )
                        .expect("nvembed_vectorizer_read");
                    let row = rows.first();
                    let texts: Vec<Option<Vec<u8>>> = row
                        .get::<pgrx::Array<&[u8]>>(1)
                        .expect("texts")
                        .map(|texts| texts.iter().map(|text| text.map(<[u8]>::to_vec)).collect())
                        .unwrap_or_default();
                    let errors: Vec<Option<String>> = row.get(2).expect("errors").unwrap_or_default();
                    Ok((texts, errors))
                })
            })
        } else {
            Err(format!(
                "the vectorizer's owner (role {owner}) was dropped; drop the vectorizer and create it again"
            ))
        };
        match read {
            Ok((texts, read_errors)) => {
                return Some(Batch {
                    vectorizer_id,
                    owner,
                    instruction,
                    max_length: max_length as usize,
                    chunking,
                    row_keys,
                    texts,
                    read_errors,
                })
            }
            Err(error) => {
                Spi::run_with_args(
                    &format!(
                        "SELECT {schema}.nvembed_vectorizer_fail($1, $2,
                                pg_catalog.array_fill($3::pg_catalog.text,
                                                      ARRAY[pg_catalog.array_length($2::pg_catalog.text[], 1)]))"
                    ),
                    &[vectorizer_id.into(), row_keys.as_str().into(), error.as_str().into()],
                )
                .expect("nvembed_vectorizer_fail");
            }
        }
    })
}

/// The batch's texts that are not NULL.
fn texts_of(batch: &Batch) -> Vec<String> {
    // convert_to(..., 'UTF8') made them, so this never replaces anything.
    batch
        .texts
        .iter()
        .flatten()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect()
}

/// `call` for each of `items` alone, after a call for all of them failed for the texts' sake
/// or lost its connection: each item's result or why it failed, or the model server's own
/// failure, which ends the narrowing.
fn each_alone<T>(items: &[String], call: impl Fn(&String) -> Result<T, CallError>) -> Result<Vec<Result<T, String>>, CallError> {
    items
        .iter()
        .map(|item| match call(item) {
            Ok(result) => Ok(Ok(result)),
            Err(e) if e.blame == Blame::Server => Err(e),
            Err(e) => Ok(Err(e.message)),
        })
        .collect()
}

/// A chunk batch's texts cut into chunks: each text's chunks, or why it could not be cut. A
/// failure that is the texts' own, or a lost connection, is narrowed down text by text; one
/// that is the model server's is returned.
fn cut(batch: &Batch, (max_tokens, overlap): (usize, usize), texts: &[String]) -> Result<Vec<Result<Vec<Range<usize>>, String>>, CallError> {
    match client::try_chunk(&batch.instruction, max_tokens, overlap, texts) {
        Ok(spans) => Ok(spans.into_iter().map(Ok).collect()),
        Err(e) if e.blame == Blame::Server => Err(e),
        Err(_) => each_alone(texts, |text| {
            client::try_chunk(&batch.instruction, max_tokens, overlap, std::slice::from_ref(text))
                .map(|mut spans| spans.pop().unwrap_or_default())
        }),
    }
}

/// The vectors of each batch's `inputs` (or why each input failed), or the model server's own
/// failure. The batches' calls run at once, one per batch (each on its own server where there
/// are several); a chunk batch's inputs go in calls the server admits (at most
/// nvembed.max_request_tokens, each chunk counted at its length), one after the other. A call
/// that fails for its texts, or loses its connection, is narrowed down input by input.
fn embed_inputs(batches: &[Batch], inputs: &[Vec<String>]) -> Vec<Result<Vec<Result<Vec<f32>, String>>, CallError>> {
    let per_call: Vec<usize> = batches
        .iter()
        .map(|batch| match batch.chunking {
            Some(_) => (crate::gucs::max_request_tokens() / batch.max_length.max(1)).max(1),
            None => usize::MAX,
        })
        .collect();
    let mut results: Vec<Result<Vec<Result<Vec<f32>, String>>, CallError>> =
        inputs.iter().map(|inputs| Ok(Vec::with_capacity(inputs.len()))).collect();
    let mut done = vec![0usize; batches.len()];
    loop {
        // Each batch still embedding (and not failed) with its next call.
        let round: Vec<(usize, &[String])> = (0..batches.len())
            .filter(|&b| results[b].is_ok() && done[b] < inputs[b].len())
            .map(|b| (b, &inputs[b][done[b]..(done[b].saturating_add(per_call[b])).min(inputs[b].len())]))
            .collect();
        if round.is_empty() {
            return results;
        }
        let calls: Vec<BatchCall> = round
            .iter()
            .map(|&(b, texts)| BatchCall {
                instruction: &batches[b].instruction,
                max_length: batches[b].max_length,
                texts,
            })
            .collect();
        for ((b, texts), outcome) in round.into_iter().zip(client::try_embed_batches(&calls)) {
            done[b] += texts.len();
            let vectors = match outcome {
                Ok(vectors) => Ok(vectors.into_iter().map(Ok).collect()),
                Err(e) if e.blame == Blame::Server => Err(e),
                Err(_) => each_alone(texts, |input| {
                    client::try_embed_alone(&batches[b].instruction, batches[b].max_length, input)
                }),
            };
            match (vectors, &mut results[b]) {
                (Ok(vectors), Ok(all)) => all.extend(vectors),
                (Ok(_), Err(_)) => {}
                (Err(e), result) => *result = Err(e),
            }
        }
    }
}

/// Embeds the batches at once (each on its own server where there are several), one result
/// per text that is not NULL. A failure that is the texts' own, or a lost connection (a text
/// may crash the model server), is narrowed down text by text (chunk by chunk); one that is
/// the model server's (unreachable, model not loadable) is returned.
fn embed(batches: &[Batch]) -> Vec<Result<Vec<Embedded>, CallError>> {
    let texts: Vec<Vec<String>> = batches.iter().map(texts_of).collect();
    // Chunk batches' texts cut into chunks first (None: a batch whose texts are embedded whole).
    let cuts: Vec<Result<Option<Vec<Result<Vec<Range<usize>>, String>>>, CallError>> = batches
        .iter()
        .zip(&texts)
        .map(|(batch, texts)| batch.chunking.map(|chunking| cut(batch, chunking, texts)).transpose())
        .collect();
    // What the model embeds for each batch: its texts, or the chunks of the texts that were cut.
    let inputs: Vec<Vec<String>> = texts
        .iter()
        .zip(&cuts)
        .map(|(texts, cut)| match cut {
            Ok(None) => texts.clone(),
            Ok(Some(cuts)) => texts
                .iter()
                .zip(cuts)
                .filter_map(|(text, spans)| spans.as_ref().ok().map(|spans| (text, spans)))
                .flat_map(|(text, spans)| spans.iter().map(|span| text[span.clone()].to_string()))
                .collect(),
            Err(_) => Vec::new(),
        })
        .collect();
    let vectors = embed_inputs(batches, &inputs);
    vectors
        .into_iter()
        .zip(cuts)
        .map(|(vectors, cut)| {
            let cuts = cut?;
            let vectors = vectors?;
            let mut vectors = vectors.into_iter();
            Ok(match cuts {
                None => vectors
                    .map(|vector| vector.map_or_else(Embedded::Failed, Embedded::Vector))
                    .collect(),
                // A text is written when every one of its chunks was embedded.
                Some(cuts) => cuts
                    .into_iter()
                    .map(|spans| match spans {
                        Err(error) => Embedded::Failed(error),
                        Ok(spans) => {
                            let chunks: Vec<_> = spans.into_iter().zip(vectors.by_ref()).collect();
                            match chunks.iter().find_map(|(_, vector)| vector.as_ref().err()) {
                                Some(error) => Embedded::Failed(error.clone()),
                                None => Embedded::Chunks(
                                    chunks.into_iter().map(|(span, vector)| (span, vector.expect("checked"))).collect(),
                                ),
                            }
                        }
                    })
                    .collect(),
            })
        })
        .collect()
}

/// Writes what was embedded as the owner and settles the batch's entries (one transaction).
fn complete(schema: &str, batch: &Batch, results: Vec<Embedded>) {
    let mut errors: Vec<Option<String>> = Vec::with_capacity(batch.texts.len());
    let mut vectors = Vec::new();
    let mut dimension = None;
    // A chunk vectorizer's chunks: the row (from 1) each belongs to, and its UTF-8.
    let mut chunk_rows: Vec<i32> = Vec::new();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut results = results.into_iter();
    let wrong_dimension = |got: usize, expected: Option<usize>| {
        format!(
            "the model server returned a {got}-dimensional vector among {}-dimensional ones (was the model changed?)",
            expected.unwrap_or_default()
        )
    };
    for (row, (text, read_error)) in batch.texts.iter().zip(&batch.read_errors).enumerate() {
        if read_error.is_some() {
            errors.push(read_error.clone());
            continue;
        }
        match text.as_ref().map(|text| (text, results.next().expect("one result per text"))) {
            None => errors.push(None),
            Some((_, Embedded::Vector(vector))) if dimension.is_none_or(|d| d == vector.len()) => {
                dimension = Some(vector.len());
                vectors.extend(vector);
                errors.push(None);
            }
            Some((_, Embedded::Vector(vector))) => errors.push(Some(wrong_dimension(vector.len(), dimension))),
            Some((text, Embedded::Chunks(pieces))) => {
                if let Some((_, vector)) = pieces.iter().find(|(_, v)| dimension.is_some_and(|d| d != v.len())) {
                    errors.push(Some(wrong_dimension(vector.len(), dimension)));
                    continue;
                }
                for (span, vector) in pieces {
                    dimension = Some(vector.len());
                    chunk_rows.push(row as i32 + 1);
                    chunks.push(text[span].to_vec());
                    vectors.extend(vector);
                }
                errors.push(None);
            }
            Some((_, Embedded::Failed(error))) => errors.push(Some(error)),
        }
    }
    BackgroundWorker::transaction(|| {
        let outcome = as_role(batch.owner, || match batch.chunking {
            None => Spi::get_one_with_args::<Vec<Option<String>>>(
                &format!("SELECT {schema}.nvembed_vectorizer_write($1, $2, $3, $4, $5, $6)"),
                &[
                    batch.vectorizer_id.into(),
                    batch.row_keys.as_str().into(),
                    batch.texts.clone().into(),
                    vectors.clone().into(),
                    (dimension.unwrap_or(0) as i32).into(),
                    errors.clone().into(),
                ],
            )
            .expect("nvembed_vectorizer_write"),
            Some(_) => write_chunks(schema, batch, &errors, &chunk_rows, &chunks, &vectors, dimension.unwrap_or(0)),
        });
        // None: the vectorizer was dropped meanwhile, and its entries with it.
        if let Some(outcome) = outcome {
            Spi::run_with_args(
                &format!("SELECT {schema}.nvembed_vectorizer_settle($1, $2, $3, $4, $5)"),
                &[
                    batch.vectorizer_id.into(),
                    batch.row_keys.as_str().into(),
                    batch.texts.clone().into(),
                    outcome.into(),
                    errors.clone().into(),
                ],
            )
            .expect("nvembed_vectorizer_settle");
        }
    });
}

/// Floats one write of a chunk batch carries at most (64 MB): a batch of long documents is
/// written by several statements of its transaction, a row's chunks always by one.
const MAX_WRITE_FLOATS: usize = 1 << 24;

/// Writes a chunk batch's rows (`chunk_rows[i]`, from 1, is chunk i's row) in groups of rows
/// whose vectors fit MAX_WRITE_FLOATS; the outcome of every row, or None when the vectorizer
/// was dropped meanwhile.
fn write_chunks(
    schema: &str,
    batch: &Batch,
    errors: &[Option<String>],
    chunk_rows: &[i32],
    chunks: &[Vec<u8>],
    vectors: &[f32],
    dimension: usize,
) -> Option<Vec<Option<String>>> {
    let rows = batch.texts.len();
    let mut outcome = Vec::with_capacity(rows);
    let (mut first_row, mut first_chunk) = (0, 0);
    while first_row < rows {
        // Rows first_row..last_row, whose chunks are first_chunk..last_chunk.
        let (mut last_row, mut last_chunk) = (first_row, first_chunk);
        loop {
            let row_end = last_chunk + chunk_rows[last_chunk..].iter().take_while(|&&r| r as usize == last_row + 1).count();
            if last_row > first_row && (row_end - first_chunk) * dimension > MAX_WRITE_FLOATS {
                break;
            }
            last_row += 1;
            last_chunk = row_end;
            if last_row == rows {
                break;
            }
        }
        let row_keys = Spi::get_one_with_args::<String>(
            "SELECT (($1::pg_catalog.text[])[$2:$3][:])::pg_catalog.text",
            &[batch.row_keys.as_str().into(), (first_row as i32 + 1).into(), (last_row as i32).into()],
        )
        .expect("a batch's keys")
        .expect("keys");
        let renumbered: Vec<i32> = chunk_rows[first_chunk..last_chunk].iter().map(|r| r - first_row as i32).collect();
        let written = Spi::get_one_with_args::<Vec<Option<String>>>(
            &format!("SELECT {schema}.nvembed_vectorizer_write_chunks($1, $2, $3, $4, $5, $6, $7, $8)"),
            &[
                batch.vectorizer_id.into(),
                row_keys.into(),
                batch.texts[first_row..last_row].to_vec().into(),
                errors[first_row..last_row].to_vec().into(),
                renumbered.into(),
                chunks[first_chunk..last_chunk].to_vec().into(),
                vectors[first_chunk * dimension..last_chunk * dimension].to_vec().into(),
                (dimension as i32).into(),
            ],
        )
        .expect("nvembed_vectorizer_write_chunks")?;
        outcome.extend(written);
        (first_row, first_chunk) = (last_row, last_chunk);
    }
    Some(outcome)
}

fn release(schema: &str, batch: &Batch, error: &CallError) {
    BackgroundWorker::transaction(|| {
        Spi::run_with_args(
            &format!("SELECT {schema}.nvembed_vectorizer_release($1, $2, $3)"),
            &[
                batch.vectorizer_id.into(),
                batch.row_keys.as_str().into(),
                error.message.as_str().into(),
            ],
        )
        .expect("nvembed_vectorizer_release");
    });
}

/// Claims left with this worker's pid come from a worker that had the same pid before a crash.
fn release_own_claims(schema: &str) {
    BackgroundWorker::transaction(|| {
        Spi::run(&format!(
            "UPDATE {schema}.nvembed_vectorizer_queue SET claimed_by = NULL
             WHERE claimed_by OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()"
        ))
        .expect("releasing this pid's claims");
    });
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nvembed_vectorizer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // Its calls count apart from the applications that log in as the role it connects as: it
    // holds one connection at a time, and a role at its limit must not stall it.
    crate::connection::call_as(format!("nvembed vectorizer worker of database \"{database}\""));
    log!("nvembed: vectorizer worker started in database \"{database}\"");
    let mut missing_logged = false;
    let mut released = false;
    let mut failing: Option<String> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut wait = Duration::ZERO;
    while !shutting_down() {
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading postgresql.conf is what a worker does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let schema = match look_around() {
            Surroundings::StepAside => {
                log!(
                    "nvembed: the vectorizer worker of database \"{database}\" leaves it: another session is dropping or renaming it, or copying it as a template"
                );
                break;
            }
            Surroundings::Extension(schema) => schema,
            Surroundings::NoExtension => {
                if !missing_logged {
                    log!(
                        "nvembed: database \"{database}\" is listed in nvembed.vectorizer_databases but has no nvembed extension; the vectorizer worker waits for CREATE EXTENSION nvembed"
                    );
                    missing_logged = true;
                }
                released = false;
                wait = NO_EXTENSION_POLL;
                continue;
            }
        };
        missing_logged = false;
        let schema = quote_identifier(&schema);
        if !released {
            release_own_claims(&schema);
            released = true;
        }
        // One batch per server it can reach, embedded at once: N servers drain the queue
        // about N times as fast as one.
        let mut batches = Vec::new();
        while batches.len() < endpoints::usable() {
            match claim(&schema) {
                Some(batch) => batches.push(batch),
                None => break,
            }
        }
        if batches.is_empty() {
            wait = IDLE_POLL;
            continue;
        }
        let mut failure = None;
        for (batch, outcome) in batches.iter().zip(embed(&batches)) {
            match outcome {
                Ok(results) => complete(&schema, batch, results),
                // its claims are released by the next claim
                Err(_) if shutting_down() => {}
                Err(error) => {
                    release(&schema, batch, &error);
                    failure = Some(error);
                }
            }
        }
        if shutting_down() {
            break;
        }
        match failure {
            None => {
                if failing.take().is_some() {
                    log!("nvembed: the vectorizer worker of database \"{database}\" embeds again");
                }
                backoff = FIRST_BACKOFF;
                wait = Duration::ZERO;
            }
            Some(error) => {
                if failing.as_ref() != Some(&error.message) {
                    warning!(
                        "nvembed: the vectorizer worker of database \"{database}\" cannot embed: {}; retrying with backoff",
                        error.message
                    );
                    failing = Some(error.message);
                }
                wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
