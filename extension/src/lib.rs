//! nvembed: NV-Embed-v2 embeddings inside PostgreSQL.
//!
//! Postgres glue only: GUCs, the SQL surface, the supervisor and vectorizer workers and the IPC
//! client. The model itself runs in the `nvembed-model-server` process (the `nvembed-engine`
//! crate), on this host or on the remote servers of `nvembed.servers`.

use pgrx::prelude::*;

use endpoints::SERVERS;

mod call_error;
mod chunks;
mod client;
mod connection;
mod endpoints;
mod functions;
mod gucs;
mod transport;
mod vectorizer;
mod worker;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!(
    "../sql/functions.sql",
    name = "functions",
    requires = [
        functions::nvembed_embed_utf8,
        functions::nvembed_embed_many_utf8,
        functions::nvembed_task_instruction
    ]
);
pgrx::extension_sql_file!("../sql/status.sql", name = "status", requires = [functions::nvembed_server_status]);
pgrx::extension_sql_file!("../sql/trigger.sql", name = "trigger", requires = ["functions"]);
pgrx::extension_sql_file!("../sql/backfill.sql", name = "backfill", requires = ["functions"]);
pgrx::extension_sql_file!(
    "../sql/vectorizer.sql",
    name = "vectorizer",
    requires = ["functions", "chunks", functions::nvembed_model_dimension]
);
pgrx::extension_sql_file!(
    "../sql/chunks.sql",
    name = "chunks",
    requires = [chunks::nvembed_chunk_settings, chunks::nvembed_chunks_utf8]
);
pgrx::extension_sql_file!(
    "../sql/search.sql",
    name = "search",
    requires = ["functions", "vectorizer", functions::nvembed_model_dimension]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    // SAFETY: reading a flag the postmaster sets while it loads preload libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        connection::PRELOADED.store(true, std::sync::atomic::Ordering::Relaxed);
        pgrx::pg_shmem_init!(SERVERS);
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod chunk_tests;
#[cfg(any(test, feature = "pg_test"))]
mod search_tests;
#[cfg(any(test, feature = "pg_test"))]
mod serving_tests;
#[cfg(any(test, feature = "pg_test"))]
mod sql_tests;
#[cfg(any(test, feature = "pg_test"))]
mod vectorizer_tests;
#[cfg(any(test, feature = "pg_test"))]
mod write_path_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // The model is a server-wide setting: the tests' model is the fixture that `make test`
        // prepares (tests that need another one change it with ALTER SYSTEM and a reload).
        let fixture = option_env!("NVEMBED_TEST_FIXTURE").unwrap_or("/tmp/nvembed-test-fixture");
        let model: &'static str = Box::leak(format!("nvembed.model = '{fixture}/nvembed-tiny-a'").into_boxed_str());
        // The vectorizer worker drains the test database's queues.
        vec![
            "shared_preload_libraries = 'nvembed'",
            model,
            "nvembed.vectorizer_databases = 'pgrx_tests'",
            // The goldens are f32 results.
            "nvembed.dtype = 'f32'",
        ]
    }
}
