//! SQL-level tests of the paths around the embedding calls: the row trigger's limits, the
//! backfill's transaction and size rules, the session cache, and the vectorizer worker in a
//! database of its own (unreadable rows; DROP, RENAME and TEMPLATE of its database).

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::sql_tests::tests::{
        alter_system, assert_error, remote_exec, remote_session, remote_text, seconds, self_connection, status_value,
        use_fixture, use_fixture_exclusively,
    };

    fn requests() -> i64 {
        status_value("requests").parse().unwrap()
    }

    /// "rows with a text, of them rows holding their own text's passage vector (≤ 1e-6)".
    fn embedded(name: &str, table: &str) -> String {
        remote_text(
            name,
            &format!(
                "SELECT count(body) || ',' || count(*) FILTER (WHERE (SELECT max(abs(x - y)) FROM unnest(e, nvembed_passage(body)) u(x, y)) <= 1e-6)
                 FROM {table}"
            ),
        )
    }

    #[pg_test]
    fn the_trigger_refuses_a_generated_source_and_must_fire_last() {
        use_fixture();
        Spi::run(
            "CREATE TABLE tg (id int PRIMARY KEY, title text, content text,
                              body text GENERATED ALWAYS AS (title || ' ' || content) STORED, e real[])",
        )
        .unwrap();
        assert_error(
            "CREATE TRIGGER embed BEFORE INSERT OR UPDATE ON tg FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'e')",
            "0A000",
            "cannot embed generated column \"body\"",
        );
        // Made before the column was generated (dropped and added again), it refuses each write.
        Spi::run(
            "ALTER TABLE tg RENAME COLUMN body TO old_body;
             CREATE TRIGGER embed BEFORE INSERT OR UPDATE ON tg FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'e');
             ALTER TABLE tg DROP COLUMN old_body, ADD COLUMN body text GENERATED ALWAYS AS (title || ' ' || content) STORED",
        )
        .unwrap();
        assert_error(
            "INSERT INTO tg (id, title, content) VALUES (1, 'a', 'b')",
            "0A000",
            "cannot embed generated column \"body\"",
        );
        // BEFORE triggers fire in name order: one that rewrites the text after nvembed's leaves
        // a vector of the text before (nvembed warns); renamed as the warning's hint says, the
        // vector is the stored text's.
        Spi::run(
            "CREATE TABLE tl (id int PRIMARY KEY, body text, e real[]);
             CREATE FUNCTION tl_lower() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.body := lower(NEW.body); RETURN NEW; END $$;
             CREATE TRIGGER embed BEFORE INSERT OR UPDATE ON tl FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'e');
             CREATE TRIGGER normalize BEFORE INSERT OR UPDATE ON tl FOR EACH ROW EXECUTE FUNCTION tl_lower();
             INSERT INTO tl VALUES (1, 'Mixed Case Text');
             ALTER TRIGGER embed ON tl RENAME TO zz_embed;
             INSERT INTO tl VALUES (2, 'Mixed Case Text')",
        )
        .unwrap();
        let matches = |id: i32| {
            Spi::get_one_with_args::<bool>(
                "SELECT (SELECT max(abs(x - y)) FROM unnest(e, nvembed_passage(body)) u(x, y)) <= 1e-6 FROM tl WHERE id = $1",
                &[id.into()],
            )
            .unwrap()
            .unwrap()
        };
        assert!(!matches(1), "the text was rewritten after it was embedded");
        assert!(matches(2));
    }

    #[pg_test]
    fn backfill_refuses_a_transaction_block_before_any_compute() {
        use_fixture_exclusively();
        remote_session("bt");
        remote_exec(
            "bt",
            "CREATE TABLE bt (id int PRIMARY KEY, body text, e real[]);
             INSERT INTO bt SELECT g, 'transaction block ' || g FROM generate_series(1, 5) g",
        );
        let before = requests();
        remote_exec("bt", "BEGIN");
        assert_error(
            "PERFORM dblink_exec('bt', 'CALL nvembed_backfill(''bt'', ''body'', ''e'')')",
            "25001",
            "nvembed_backfill cannot run inside a transaction block",
        );
        remote_exec("bt", "ROLLBACK");
        // Called from a function (an atomic context) it is refused the same way.
        assert_error("CALL nvembed_backfill('bt', 'body', 'e')", "25001", "commits after each batch");
        assert_eq!(requests(), before, "no model call was made");
        remote_exec("bt", "CALL nvembed_backfill('bt', 'body', 'e')");
        assert_eq!(embedded("bt", "bt"), "5,5");
        remote_exec("bt", "DROP TABLE bt");
        Spi::run("SELECT dblink_disconnect('bt')").unwrap();
    }

    #[pg_test]
    fn backfill_splits_batches_that_exceed_the_request_limit() {
        use_fixture_exclusively();
        remote_session("bl");
        // ~60 tokens a text, 200 tokens a call: the default batch of 64 rows is split until
        // the parts fit (16 rows: ~1,000 tokens).
        alter_system("ALTER SYSTEM SET nvembed.max_request_tokens = 200");
        remote_exec(
            "bl",
            "CREATE TABLE bl (id int PRIMARY KEY, body text, e real[]);
             INSERT INTO bl SELECT g, g || repeat(' a longer document', 20) FROM generate_series(1, 16) g",
        );
        remote_exec("bl", "CALL nvembed_backfill('bl', 'body', 'e')");
        alter_system("ALTER SYSTEM RESET nvembed.max_request_tokens");
        assert_eq!(embedded("bl", "bl"), "16,16");
        remote_exec("bl", "DROP TABLE bl");
        Spi::run("SELECT dblink_disconnect('bl')").unwrap();
    }

    #[pg_test]
    fn each_distinct_text_of_a_statement_is_embedded_once() {
        use_fixture_exclusively();
        remote_session("cq");
        remote_exec(
            "cq",
            "CREATE TABLE cq (id int PRIMARY KEY, body text);
             INSERT INTO cq SELECT g, 'cached candidate ' || g FROM generate_series(1, 200) g",
        );
        // Two query texts over 200 rows: two model calls, not 400.
        let before = requests();
        assert_eq!(
            remote_text(
                "cq",
                "SELECT count(*)::text FROM cq WHERE nvembed_query('cache: first query')::text <> nvembed_query('cache: second query')::text"
            ),
            "200"
        );
        assert_eq!(requests() - before, 2);
        // A re-rank of 50 candidates against one query: 51 texts, 51 calls.
        let before = requests();
        remote_text(
            "cq",
            "SELECT string_agg(id::text, ',') FROM (
                 SELECT id FROM cq WHERE id <= 50
                 ORDER BY (SELECT sum(x * y) FROM unnest(nvembed_passage(body), nvembed_query('cache: rerank query')) u(x, y)) DESC
                 LIMIT 5) top",
        );
        assert_eq!(requests() - before, 51);
        remote_exec("cq", "DROP TABLE cq");
        Spi::run("SELECT dblink_disconnect('cq')").unwrap();
    }

    /// Polls `ready` until it holds; fails the test after 30 s, saying what was awaited.
    fn wait_until(what: &str, ready: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !ready() {
            assert!(seconds(started) < 30.0, "{what} did not happen within 30 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits until the model server's status reports a dtype for which `ready` holds (the
    /// configured name until the model is loaded, then the one it was loaded in).
    fn wait_for_dtype(ready: impl Fn(&str) -> bool) {
        wait_until("the model server's restart with another dtype", || {
            Spi::get_one::<String>("SELECT dtype FROM nvembed_status()")
                .unwrap()
                .as_deref()
                .is_some_and(&ready)
        });
    }

    #[pg_test]
    fn a_session_never_answers_from_a_cache_of_another_dtype() {
        use_fixture_exclusively();
        alter_system("ALTER SYSTEM SET nvembed.dtype = 'f32'");
        wait_for_dtype(|d| d == "f32");
        remote_session("old");
        let sql = format!("SELECT nvembed_passage({})::text", pgrx::spi::quote_literal("cache: one text, two dtypes"));
        let f32_vector = remote_text("old", &sql);
        alter_system("ALTER SYSTEM SET nvembed.dtype = 'bf16'");
        wait_for_dtype(|d| d == "bf16");
        remote_session("new");
        let bf16_vector = remote_text("new", &sql);
        // The session that asked before the reload asks again.
        let old_session_now = remote_text("old", &sql);
        alter_system("ALTER SYSTEM RESET nvembed.dtype");
        wait_for_dtype(|d| d != "bf16");
        assert_ne!(f32_vector, bf16_vector, "bf16 rounds differently from f32");
        assert_eq!(old_session_now, bf16_vector);
        Spi::run("SELECT dblink_disconnect('old'), dblink_disconnect('new')").unwrap();
    }

    /// Waits until a vectorizer worker is connected to `database`.
    fn wait_for_worker(database: &str) {
        wait_until(&format!("a vectorizer worker's connection to {database}"), || {
            // (pg_stat_activity is read once per transaction unless its snapshot is cleared.)
            Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
            Spi::get_one_with_args::<i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'nvembed vectorizer' AND datname = $1",
                &[database.into()],
            )
            .unwrap()
                == Some(1)
        });
    }

    #[pg_test]
    fn an_unreadable_row_fails_alone_and_the_worker_steps_aside_for_its_database() {
        use_fixture_exclusively();
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        let conn = self_connection();
        let admin = |sql: &str| {
            Spi::run_with_args("SELECT dblink_exec($1, $2)", &[conn.clone().into(), sql.into()]).unwrap();
        };
        admin("CREATE DATABASE nvembed_ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_databases = 'pgrx_tests, nvembed_ascii'");
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_max_attempts = 1");
        let ascii = conn.replace("dbname=", "dbname=nvembed_ascii fallback_application_name=");
        Spi::run_with_args("SELECT dblink_connect('asc', $1)", &[ascii.clone().into()]).unwrap();
        // One row of eleven has a byte that is not UTF-8 (an SQL_ASCII database stores it).
        remote_exec(
            "asc",
            r#"CREATE EXTENSION nvembed;
               CREATE TABLE a (id int PRIMARY KEY, body text, e real[]);
               SELECT nvembed_create_vectorizer('a', 'body', 'e');
               INSERT INTO a SELECT g, CASE g WHEN 5 THEN E'bad \xff byte' ELSE 'readable row ' || g END FROM generate_series(1, 11) g"#,
        );
        let started = std::time::Instant::now();
        while remote_text("asc", "SELECT (pending + in_progress)::text FROM nvembed_vectorizer_status") != "0" {
            assert!(seconds(started) < 60.0, "the queue was not drained");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(
            remote_text(
                "asc",
                "SELECT count(*) FILTER (WHERE id <> 5 AND (SELECT max(abs(x - y)) FROM unnest(e, nvembed_passage(body)) u(x, y)) <= 1e-6)
                        || ',' || count(e) FROM a"
            ),
            "10,10"
        );
        assert_eq!(
            remote_text(
                "asc",
                "SELECT row_key[1] || ': ' || (position('invalid byte sequence' in last_error) > 0)::text FROM nvembed_vectorizer_failures"
            ),
            "5: true"
        );
        Spi::run("SELECT dblink_disconnect('asc')").unwrap();
        // The worker steps aside for each command that needs the database to itself.
        wait_for_worker("nvembed_ascii");
        admin("ALTER DATABASE nvembed_ascii RENAME TO nvembed_ascii_renamed");
        admin("ALTER DATABASE nvembed_ascii_renamed RENAME TO nvembed_ascii");
        wait_for_worker("nvembed_ascii");
        admin("CREATE DATABASE nvembed_ascii_copy TEMPLATE nvembed_ascii");
        admin("DROP DATABASE nvembed_ascii_copy");
        wait_for_worker("nvembed_ascii");
        admin("DROP DATABASE nvembed_ascii");
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_databases = 'pgrx_tests'");
        alter_system("ALTER SYSTEM RESET nvembed.vectorizer_max_attempts");
    }
}
