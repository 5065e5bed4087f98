//! The vectorizer workers: one dynamic background worker per database listed in
//! nvembed.vectorizer_databases drains that database's vectorizer queues (`sql/vectorizer.sql`
//! has the queue's rules). The supervisor starts them, restarts one that exits (with backoff)
//! and stops those whose database leaves the list.
//!
//! A worker's loop: claim a batch (a short transaction), embed it through the model server as
//! bulk work with no transaction open, write it (a second transaction). A failure that is a
//! text's own (nothing left to pool, too long, not finite) is retried text by text, so one bad
//! text never holds back the others; a failure that is the model server's (unreachable, model
//! not loadable) leaves the batch queued and the worker waits, backing off.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::client::{self, CallError};

/// Advisory lock class ('nvvw') under which each worker holds a session lock keyed by its pid,
/// for as long as it lives: a claim whose worker holds no such lock is released.
pub const WORKER_LOCK_CLASS: i32 = 0x6e76_7677;
/// How long an idle worker waits before looking at the queues again.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long a worker waits for CREATE EXTENSION nvembed in a database that lacks it.
const NO_EXTENSION_POLL: Duration = Duration::from_secs(1);
/// Backoff of a worker whose model server calls fail, and of restarts of a worker that exits.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting is restarted after FIRST_BACKOFF again.
const STABLE_RUN: Duration = Duration::from_secs(10);

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
                        supervised.next_start = Instant::now() + supervised.backoff;
                        supervised.backoff = (supervised.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            if supervised.worker.is_none() && Instant::now() >= supervised.next_start {
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
                        supervised.next_start = Instant::now() + supervised.backoff;
                        supervised.backoff = (supervised.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}

/// A claimed batch: handed back to the SQL functions unchanged, with the vectors.
struct Batch {
    vectorizer_id: i32,
    instruction: String,
    max_length: usize,
    row_keys: String,
    /// UTF-8, as claimed: handed back for the check that the row still has this text.
    texts: Vec<Option<Vec<u8>>>,
}

fn shutting_down() -> bool {
    // SAFETY: a flag set by the SIGTERM handler.
    unsafe { std::ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// The schema of the nvembed extension in this database, if it is installed.
fn extension_schema() -> Option<String> {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<String>(
            "SELECT n.nspname::text FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
             WHERE e.extname = 'nvembed'",
        )
        .unwrap_or(None)
    })
}

fn claim(schema: &str) -> Option<Batch> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            let rows = client
                .select(
                    &format!(
                        "SELECT vectorizer_id, instruction, max_length, row_keys, texts FROM {schema}.nvembed_vectorizer_claim($1)"
                    ),
                    None,
                    &[crate::gucs::vectorizer_batch_rows().into()],
                )
                .expect("nvembed_vectorizer_claim");
            let row = rows.first();
            Some(Batch {
                vectorizer_id: row.get::<i32>(1).expect("vectorizer_id")?,
                instruction: row.get::<String>(2).expect("instruction")?,
                max_length: row.get::<i32>(3).expect("max_length")? as usize,
                row_keys: row.get::<String>(4).expect("row_keys")?,
                texts: row
                    .get::<pgrx::Array<&[u8]>>(5)
                    .expect("texts")?
                    .iter()
                    .map(|text| text.map(<[u8]>::to_vec))
                    .collect(),
            })
        })
    })
}

/// Embeds the batch's texts; a failure that is the texts' own is narrowed down text by text.
/// Returns each text's vector or error, or the failure that is no text's fault.
fn embed(batch: &Batch) -> Result<Vec<Result<Vec<f32>, String>>, CallError> {
    // convert_to(..., 'UTF8') made them, so this never replaces anything.
    let texts: Vec<String> = batch
        .texts
        .iter()
        .flatten()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect();
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    match client::try_embed_batch(&batch.instruction, batch.max_length, &texts) {
        Ok(vectors) => Ok(vectors.into_iter().map(Ok).collect()),
        Err(e) if e.is_the_texts_fault() && texts.len() > 1 => {
            let mut results = Vec::with_capacity(texts.len());
            for text in texts {
                match client::try_embed_batch(&batch.instruction, batch.max_length, std::slice::from_ref(&text)) {
                    Ok(mut vectors) => results.push(Ok(vectors.remove(0))),
                    Err(e) if e.is_the_texts_fault() => results.push(Err(e.message)),
                    Err(e) => return Err(e),
                }
            }
            Ok(results)
        }
        Err(e) if e.is_the_texts_fault() => Ok(vec![Err(e.message)]),
        Err(e) => Err(e),
    }
}

/// Writes what was embedded and settles the batch's entries (a text that failed is a failed
/// attempt of its entry).
fn complete(schema: &str, batch: &Batch, results: Vec<Result<Vec<f32>, String>>) {
    let mut errors: Vec<Option<String>> = Vec::with_capacity(batch.texts.len());
    let mut vectors = Vec::new();
    let mut dimension = 0;
    let mut results = results.into_iter();
    for text in &batch.texts {
        match text.as_ref().map(|_| results.next().expect("one result per text")) {
            None => errors.push(None),
            Some(Ok(vector)) => {
                dimension = vector.len();
                vectors.extend(vector);
                errors.push(None);
            }
            Some(Err(error)) => errors.push(Some(error)),
        }
    }
    BackgroundWorker::transaction(|| {
        Spi::run_with_args(
            &format!("SELECT {schema}.nvembed_vectorizer_complete($1, $2, $3, $4, $5, $6)"),
            &[
                batch.vectorizer_id.into(),
                batch.row_keys.as_str().into(),
                batch.texts.clone().into(),
                vectors.clone().into(),
                (dimension as i32).into(),
                errors.clone().into(),
            ],
        )
        .expect("nvembed_vectorizer_complete");
    });
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

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nvembed_vectorizer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // The lock that tells claims of this worker from those of a worker that is gone.
    BackgroundWorker::transaction(|| {
        Spi::run(&format!("SELECT pg_catalog.pg_advisory_lock({WORKER_LOCK_CLASS}, pg_catalog.pg_backend_pid())"))
            .expect("advisory lock");
    });
    log!("nvembed: vectorizer worker started in database \"{database}\"");
    let mut missing_logged = false;
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
        let Some(schema) = extension_schema() else {
            if !missing_logged {
                log!(
                    "nvembed: database \"{database}\" is listed in nvembed.vectorizer_databases but has no nvembed extension; the vectorizer worker waits for CREATE EXTENSION nvembed"
                );
                missing_logged = true;
            }
            wait = NO_EXTENSION_POLL;
            continue;
        };
        missing_logged = false;
        let schema = quote_identifier(&schema);
        let Some(batch) = claim(&schema) else {
            wait = IDLE_POLL;
            continue;
        };
        match embed(&batch) {
            Ok(results) => {
                complete(&schema, &batch, results);
                if failing.take().is_some() {
                    log!("nvembed: the vectorizer worker of database \"{database}\" embeds again");
                }
                backoff = FIRST_BACKOFF;
                wait = Duration::ZERO;
            }
            Err(error) => {
                if shutting_down() {
                    break; // its claim is released by the next worker's first claim
                }
                release(&schema, &batch, &error);
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
