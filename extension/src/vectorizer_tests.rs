//! SQL-level tests of the vectorizers, drained by the test database's vectorizer worker (the
//! test configuration lists it in nvembed.vectorizer_databases). A test's own transaction is
//! never committed, so tables and vectorizers the worker must see are made in dblink sessions.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::sql_tests::tests::{
        alter_system, assert_error, remote_exec, remote_session, remote_text, seconds, use_fixture,
        use_fixture_exclusively,
    };

    /// pgvector, committed by whichever test gets there first.
    const VECTOR_EXTENSION: &str =
        "DO $$ BEGIN CREATE EXTENSION IF NOT EXISTS vector; EXCEPTION WHEN unique_violation THEN NULL; END $$";

    /// The model's dimension (nothing here depends on the fixture's).
    fn dimension() -> i32 {
        Spi::get_one::<i32>("SELECT array_length(nvembed_passage('dimension'), 1)")
            .unwrap()
            .unwrap()
    }

    /// Waits until no entry of the vectorizers of `tables` is pending or in progress; fails the
    /// test after `limit_s`.
    fn wait_drained(session: &str, tables: &str, limit_s: f64) {
        let started = std::time::Instant::now();
        let query = format!(
            "SELECT coalesce(sum(pending + in_progress), 0)::text FROM nvembed_vectorizer_status WHERE tbl::text IN ({tables})"
        );
        loop {
            let left = remote_text(session, &query);
            if left == "0" {
                return;
            }
            if seconds(started) > limit_s {
                let worker = remote_text(
                    session,
                    "SELECT coalesce(string_agg(concat_ws(' ', pid, state, wait_event_type, wait_event, query), '; '), 'no worker')
                     FROM pg_stat_activity WHERE backend_type = 'nvembed vectorizer'",
                );
                let queue = remote_text(
                    session,
                    "SELECT coalesce(string_agg(DISTINCT concat_ws(' ', vectorizer_id, claimed_by, attempts, next_attempt_at > now(), last_error), '; '), 'empty')
                     FROM nvembed_vectorizer_queue",
                );
                panic!("{left} rows of {tables} still queued after {limit_s} s; vectorizer worker: {worker}; queue: {queue}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// "rows with a text, rows whose target equals `expected` (an expression of the row) within
    /// 1e-6, rows with a target but no text" of `table`, read in session `name`.
    fn state(name: &str, table: &str, source: &str, target: &str, expected: &str) -> String {
        state_within(name, table, source, target, expected, 1e-6)
    }

    fn state_within(name: &str, table: &str, source: &str, target: &str, expected: &str, tolerance: f64) -> String {
        remote_text(
            name,
            &format!(
                "SELECT count({source}) || ',' ||
                        count(*) FILTER (WHERE (SELECT max(abs(x - y)) FROM unnest({target}::real[], {expected}) u(x, y)) <= {tolerance})
                        || ',' || count(*) FILTER (WHERE {target} IS NOT NULL AND {source} IS NULL)
                 FROM {table}"
            ),
        )
    }

    fn status(name: &str, table: &str, columns: &str) -> String {
        remote_text(
            name,
            &format!("SELECT concat_ws(',', {columns}) FROM nvembed_vectorizer_status WHERE tbl::text = '{table}'"),
        )
    }

    #[pg_test]
    fn vectorizers_keep_every_row_at_the_embedding_of_its_latest_text() {
        use_fixture();
        let dim = dimension();
        remote_session("vz");
        remote_exec(
            "vz",
            &format!(
                r#"{VECTOR_EXTENSION};
                   CREATE TABLE vz_docs (id int PRIMARY KEY, body text, embedding vector({dim}));
                   CREATE TABLE vz_half (id bigint, lang text, body varchar, e halfvec({dim}), PRIMARY KEY (lang, id)) PARTITION BY LIST (lang);
                   CREATE TABLE vz_half_en PARTITION OF vz_half FOR VALUES IN ('en');
                   CREATE TABLE vz_half_fr PARTITION OF vz_half FOR VALUES IN ('fr');
                   CREATE TABLE "VZ Arr" ("Key" text PRIMARY KEY, "Body" text, "Vec" real[]);
                   INSERT INTO vz_docs SELECT g, 'existing row ' || g, NULL FROM generate_series(1, 20) g;
                   UPDATE vz_docs SET embedding = array_fill(0.5, ARRAY[{dim}])::vector WHERE id = 1;"#
            ),
        );
        // Creating one queues the rows that have a text and no vector (row 1 keeps its own).
        remote_exec(
            "vz",
            r#"SELECT nvembed_create_vectorizer('vz_docs', 'body', 'embedding');
               SELECT nvembed_create_vectorizer('vz_half', 'body', 'e');
               SELECT nvembed_create_vectorizer('"VZ Arr"', 'Body', 'Vec');
               -- (dblink_exec takes no rows back from the last statement)
               DO $$ BEGIN END $$"#,
        );
        remote_exec(
            "vz",
            r#"INSERT INTO vz_docs SELECT g, 'new row ' || g FROM generate_series(21, 60) g;
               INSERT INTO vz_half SELECT g, CASE WHEN g % 2 = 0 THEN 'en' ELSE 'fr' END, 'partition row ' || g FROM generate_series(1, 30) g;
               INSERT INTO vz_half_en VALUES (100, 'en', 'written to the partition directly');
               INSERT INTO "VZ Arr" VALUES ('a', 'quoted names'), ('b', NULL), ('c', 'three')"#,
        );
        // A rolled-back insert queues nothing.
        remote_exec("vz", "BEGIN");
        remote_exec("vz", "INSERT INTO vz_docs VALUES (999, 'rolled back')");
        remote_exec("vz", "ROLLBACK");
        assert_eq!(
            remote_text("vz", "SELECT count(*)::text FROM nvembed_vectorizer_queue WHERE row_key = '{999}'"),
            "0"
        );
        // Changes while rows are queued or being embedded.
        remote_exec(
            "vz",
            r#"UPDATE vz_docs SET body = 'rewritten ' || id WHERE id BETWEEN 21 AND 25;
               UPDATE vz_docs SET body = NULL WHERE id = 26;
               DELETE FROM vz_docs WHERE id BETWEEN 27 AND 29;
               UPDATE vz_half SET lang = 'en' WHERE id = 3;
               UPDATE vz_half SET body = 'moved and rewritten' WHERE id = 5;
               UPDATE "VZ Arr" SET "Body" = 'now it has a text' WHERE "Key" = 'b'"#,
        );
        wait_drained("vz", "'vz_docs', 'vz_half', '\"VZ Arr\"'", 60.0);
        // Then changes to rows that are embedded already.
        remote_exec(
            "vz",
            r#"UPDATE vz_docs SET body = 'second version ' || id WHERE id BETWEEN 30 AND 32;
               UPDATE vz_docs SET body = NULL WHERE id = 33;
               UPDATE vz_docs SET body = body WHERE id = 34;
               UPDATE "VZ Arr" SET "Body" = NULL WHERE "Key" = 'c'"#,
        );
        wait_drained("vz", "'vz_docs', 'vz_half', '\"VZ Arr\"'", 60.0);
        // 60 rows - 3 deleted = 57; 55 with a text, 54 embedded by the vectorizer, row 1 kept.
        assert_eq!(state("vz", "vz_docs", "body", "embedding", "nvembed_passage(body)"), "55,54,0");
        assert_eq!(
            remote_text(
                "vz",
                &format!("SELECT (embedding = array_fill(0.5, ARRAY[{dim}])::vector)::text FROM vz_docs WHERE id = 1")
            ),
            "true"
        );
        // halfvec keeps 11 significant bits: one text's vectors from a batch and alone may round
        // to neighbouring halves.
        assert_eq!(state_within("vz", "vz_half", "body", "e", "nvembed_passage(body)", 1e-3), "31,31,0");
        assert_eq!(state("vz", r#""VZ Arr""#, r#""Body""#, r#""Vec""#, r#"nvembed_passage("Body")"#), "2,2,0");
        assert_eq!(
            status("vz", "vz_docs", "pending, in_progress, failed, last_error IS NULL, oldest_pending_age IS NULL, rows_per_second > 0, embedded >= 54"),
            "0,0,0,t,t,t,t"
        );
        assert_eq!(
            remote_text(
                "vz",
                "SELECT count(*)::text FROM nvembed_vectorizer_queue q JOIN nvembed_vectorizer v ON v.id = q.vectorizer_id
                 WHERE v.tbl::text IN ('vz_docs', 'vz_half', '\"VZ Arr\"')"
            ),
            "0"
        );
        // A detached partition leaves the vectorizer: writing to it queues nothing, and fails nothing.
        remote_exec(
            "vz",
            "ALTER TABLE vz_half DETACH PARTITION vz_half_fr; INSERT INTO vz_half_fr VALUES (300, 'fr', 'detached')",
        );
        assert_eq!(
            remote_text(
                "vz",
                "SELECT count(*)::text FROM nvembed_vectorizer_queue q JOIN nvembed_vectorizer v ON v.id = q.vectorizer_id
                 WHERE v.tbl = 'vz_half'::regclass"
            ),
            "0"
        );
        // Partitions created or attached later get the triggers too.
        remote_exec(
            "vz",
            "DELETE FROM vz_half_fr WHERE id = 300;
             ALTER TABLE vz_half ATTACH PARTITION vz_half_fr FOR VALUES IN ('fr');
             CREATE TABLE vz_half_de PARTITION OF vz_half FOR VALUES IN ('de');
             CREATE TABLE vz_half_it (LIKE vz_half);
             ALTER TABLE vz_half ATTACH PARTITION vz_half_it FOR VALUES IN ('it');
             INSERT INTO vz_half_de VALUES (400, 'de', 'a partition created later');
             INSERT INTO vz_half_it VALUES (500, 'it', 'a partition attached later')",
        );
        wait_drained("vz", "'vz_half'", 30.0);
        assert_eq!(state_within("vz", "vz_half", "body", "e", "nvembed_passage(body)", 1e-3), "33,33,0");
        // Dropping removes the triggers on the table and on each partition; vectors stay.
        remote_exec("vz", "DO $$ BEGIN PERFORM nvembed_drop_vectorizer('vz_half', 'e'); END $$");
        assert_eq!(
            remote_text(
                "vz",
                "SELECT count(*)::text FROM pg_trigger
                 WHERE tgrelid IN (SELECT 'vz_half'::regclass UNION SELECT relid FROM pg_partition_tree('vz_half'))"
            ),
            "0"
        );
        remote_exec("vz", "INSERT INTO vz_half VALUES (200, 'fr', 'after the drop')");
        assert_eq!(remote_text("vz", "SELECT count(e)::text FROM vz_half"), "33");
        // Keys are read back as they were written, whatever the writing session's settings.
        remote_exec(
            "vz",
            "CREATE TABLE vz_dated (day date, at timestamptz, score float8, body text, embedding real[], PRIMARY KEY (day, at, score));
             SELECT nvembed_create_vectorizer('vz_dated', 'body', 'embedding');
             SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Kolkata'; SET extra_float_digits = 0;
             INSERT INTO vz_dated VALUES ('04/03/2024', '2024-03-04 10:00:00+05:30', 0.1 + 0.2, 'the fourth of March'),
                                         ('13/04/2024', '2024-04-13 23:59:59.999999+05:30', 1.0 / 3, 'the thirteenth of April');
             RESET DateStyle; RESET TimeZone; RESET extra_float_digits",
        );
        wait_drained("vz", "'vz_dated'", 30.0);
        assert_eq!(state("vz", "vz_dated", "body", "embedding", "nvembed_passage(body)"), "2,2,0");
        // A vectorizer goes with its column (its update trigger's WHEN names the column: CASCADE),
        // or with its table.
        remote_exec("vz", r#"ALTER TABLE "VZ Arr" DROP COLUMN "Vec" CASCADE; DROP TABLE vz_docs, vz_half"#);
        assert_eq!(
            remote_text(
                "vz",
                r#"SELECT (SELECT count(*) FROM nvembed_vectorizer WHERE tbl::oid NOT IN (SELECT oid FROM pg_class) OR tbl = '"VZ Arr"'::regclass)
                          || ',' || (SELECT count(*) FROM nvembed_vectorizer_status WHERE tbl = '"VZ Arr"'::regclass)"#
            ),
            "0,0"
        );
        assert_eq!(
            remote_text("vz", r#"SELECT count(*)::text FROM pg_trigger WHERE tgrelid = '"VZ Arr"'::regclass"#),
            "0"
        );
        remote_exec("vz", r#"DROP TABLE "VZ Arr", vz_dated"#);
        Spi::run("SELECT dblink_disconnect('vz')").unwrap();
    }

    #[pg_test]
    fn creating_a_vectorizer_refuses_what_it_cannot_fill() {
        use_fixture();
        let dim = dimension();
        Spi::run(&format!(
            "{VECTOR_EXTENSION};
             CREATE TABLE vzr (id int PRIMARY KEY, body text, e vector({dim}), wrong vector({}), t text);
             CREATE TABLE vzr_nokey (body text, e real[]);
             CREATE VIEW vzr_view AS SELECT * FROM vzr;
             CREATE ROLE vzr_reader;
             GRANT SELECT ON vzr TO vzr_reader;",
            dim + 1
        ))
        .unwrap();
        assert_error("PERFORM nvembed_create_vectorizer('vzr_nokey', 'body', 'e')", "55000", "has no primary key");
        assert_error(
            "PERFORM nvembed_create_vectorizer('vzr', 'body', 't')",
            "42804",
            "not vector(n), halfvec(n) or real[]",
        );
        assert_error(
            "PERFORM nvembed_create_vectorizer('vzr', 'body', 'wrong')",
            "42804",
            &format!("the model's vectors have {dim}"),
        );
        assert_error("PERFORM nvembed_create_vectorizer('vzr', 'bodyy', 'e')", "42703", "bodyy");
        assert_error("PERFORM nvembed_create_vectorizer('vzr_view', 'body', 'e')", "42809", "is not a table");
        assert_error("PERFORM nvembed_create_vectorizer('vzr', 'body', 'e', 'document')", "22023", "kind must be");
        assert_error("PERFORM nvembed_drop_vectorizer('vzr', 'e')", "42704", "no vectorizer fills");
        // A role that may only read the table may not have it written for it.
        Spi::run("SET ROLE vzr_reader").unwrap();
        assert_error("PERFORM nvembed_create_vectorizer('vzr', 'body', 'e')", "42501", "permission denied to embed");
        Spi::run("RESET ROLE").unwrap();
        Spi::run("INSERT INTO vzr SELECT g, 'row ' || g FROM generate_series(1, 7) g").unwrap();
        let id = Spi::get_one::<i32>("SELECT nvembed_create_vectorizer('vzr', 'body', 'e')")
            .unwrap()
            .unwrap();
        assert_error("PERFORM nvembed_create_vectorizer('vzr', 'body', 'e')", "42710", "already fills");
        // Nor may it drop another role's vectorizer or see its queue.
        Spi::run("SET ROLE vzr_reader").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM nvembed_vectorizer_queue").unwrap(), Some(0));
        assert_error("PERFORM nvembed_drop_vectorizer('vzr', 'e')", "42501", "permission denied to drop");
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(
            Spi::get_one_with_args::<i64>(
                "SELECT count(*) FROM nvembed_vectorizer_queue WHERE vectorizer_id = $1",
                &[id.into()]
            )
            .unwrap(),
            Some(7)
        );
        Spi::run("SELECT nvembed_drop_vectorizer('vzr', 'e')").unwrap();
        assert_eq!(
            Spi::get_one_with_args::<i64>(
                "SELECT count(*) FROM nvembed_vectorizer_queue WHERE vectorizer_id = $1",
                &[id.into()]
            )
            .unwrap(),
            Some(0)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'vzr'::regclass").unwrap(),
            Some(0)
        );
    }

    #[pg_test]
    fn a_text_changed_while_its_batch_is_embedded_gets_the_vector_of_the_new_text() {
        use_fixture();
        remote_session("vzi");
        let long = "The lighthouse beam sweeps across the water in slow, steady circles. ".repeat(600);
        // Every write of a vector is logged with the text the row had then.
        remote_exec(
            "vzi",
            &format!(
                "CREATE TABLE vzi (id int PRIMARY KEY, body text, embedding real[]);
                 CREATE TABLE vzi_writes (id int, body text, embedding real[]);
                 CREATE FUNCTION vzi_log() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN INSERT INTO vzi_writes VALUES (NEW.id, NEW.body, NEW.embedding); RETURN NEW; END $$;
                 CREATE TRIGGER vzi_log AFTER UPDATE OF embedding ON vzi FOR EACH ROW EXECUTE FUNCTION vzi_log();
                 SELECT nvembed_create_vectorizer('vzi', 'body', 'embedding');
                 INSERT INTO vzi SELECT g, CASE g WHEN 1 THEN {} ELSE 'in flight ' || g END FROM generate_series(1, 6) g",
                pgrx::spi::quote_literal(&long)
            ),
        );
        // The first text (~8,000 tokens) keeps the model busy for seconds: change two texts
        // while the batch is claimed.
        let started = std::time::Instant::now();
        while status("vzi", "vzi", "in_progress") == "0" {
            assert!(seconds(started) < 10.0, "the batch was never claimed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        remote_exec("vzi", "UPDATE vzi SET body = 'changed during the batch' WHERE id IN (1, 4)");
        assert_eq!(
            status("vzi", "vzi", "in_progress"),
            "6",
            "the batch ended before the update: make its first text longer"
        );
        wait_drained("vzi", "'vzi'", 60.0);
        assert_eq!(state("vzi", "vzi", "body", "embedding", "nvembed_passage(body)"), "6,6,0");
        // No write ever stored the vector of a text other than the row's, and each row was
        // written once (rows 1 and 4 after their change).
        assert_eq!(state("vzi", "vzi_writes", "body", "embedding", "nvembed_passage(body)"), "6,6,0");
        assert_eq!(remote_text("vzi", "SELECT count(DISTINCT id)::text FROM vzi_writes"), "6");
        remote_exec("vzi", "DROP TABLE vzi, vzi_writes; DROP FUNCTION vzi_log()");
        Spi::run("SELECT dblink_disconnect('vzi')").unwrap();
    }

    #[pg_test]
    fn failing_rows_are_retried_with_backoff_then_listed_and_never_hold_back_the_others() {
        use_fixture();
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_max_attempts = 3");
        remote_session("vzf");
        // A row whose write a trigger refuses, among good rows; and a vectorizer whose every
        // text fails in the model (nothing is left to pool after a 1-token limit).
        remote_exec(
            "vzf",
            "CREATE TABLE vzf (id int PRIMARY KEY, body text, embedding real[]);
             CREATE FUNCTION vzf_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.body = 'poison' THEN RAISE EXCEPTION 'this row refuses vectors'; END IF;
               IF NEW.body = 'skip me' THEN RETURN NULL; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER vzf_refuse BEFORE UPDATE OF embedding ON vzf FOR EACH ROW EXECUTE FUNCTION vzf_refuse();
             CREATE TABLE vzf_pool (id int PRIMARY KEY, body text, embedding real[]);
             SET nvembed.max_length = 1;
             SELECT nvembed_create_vectorizer('vzf_pool', 'body', 'embedding', 'query');
             RESET nvembed.max_length;
             SELECT nvembed_create_vectorizer('vzf', 'body', 'embedding');
             INSERT INTO vzf_pool SELECT g, 'query ' || g FROM generate_series(1, 3) g;
             INSERT INTO vzf SELECT g, CASE g WHEN 5 THEN 'poison' WHEN 7 THEN 'skip me' ELSE 'good row ' || g END
             FROM generate_series(1, 10) g",
        );
        let started = std::time::Instant::now();
        wait_drained("vzf", "'vzf', 'vzf_pool'", 60.0);
        // Three attempts: 1 s and 2 s apart at least.
        assert!(seconds(started) >= 3.0, "retried without backoff");
        assert_eq!(state("vzf", "vzf", "body", "embedding", "nvembed_passage(body)"), "10,8,0");
        assert_eq!(status("vzf", "vzf", "failed, embedded"), "2,8");
        assert_eq!(status("vzf", "vzf_pool", "failed, embedded"), "3,0");
        assert_eq!(
            remote_text(
                "vzf",
                "SELECT string_agg(concat_ws(' ', tbl, row_key, attempts,
                                             position('this row refuses vectors' in last_error) > 0,
                                             position('a trigger skipped it' in last_error) > 0), ';' ORDER BY row_key)
                 FROM nvembed_vectorizer_failures WHERE tbl = 'vzf'::regclass"
            ),
            "vzf {5} 3 t f;vzf {7} 3 f t"
        );
        assert_eq!(
            remote_text(
                "vzf",
                "SELECT count(*) FILTER (WHERE last_error LIKE '%nothing left to pool%' AND attempts = 3)::text
                 FROM nvembed_vectorizer_failures WHERE tbl = 'vzf_pool'::regclass"
            ),
            "3"
        );
        let last_error = status("vzf", "vzf", "last_error");
        assert!(
            last_error.contains("this row refuses vectors") || last_error.contains("a trigger skipped it"),
            "{last_error}"
        );
        // Fixed, and retried: the row gets its vector and leaves the failures.
        remote_exec("vzf", "DROP TRIGGER vzf_refuse ON vzf");
        assert_eq!(remote_text("vzf", "SELECT nvembed_vectorizer_retry('vzf', 'embedding')::text"), "2");
        wait_drained("vzf", "'vzf'", 30.0);
        assert_eq!(state("vzf", "vzf", "body", "embedding", "nvembed_passage(body)"), "10,10,0");
        assert_eq!(status("vzf", "vzf", "failed, embedded"), "0,10");
        remote_exec("vzf", "DROP TABLE vzf, vzf_pool; DROP FUNCTION vzf_refuse()");
        Spi::run("SELECT dblink_disconnect('vzf')").unwrap();
        alter_system("ALTER SYSTEM RESET nvembed.vectorizer_max_attempts");
    }

    #[pg_test]
    fn the_worker_reads_and_writes_as_the_vectorizers_owner() {
        use_fixture();
        remote_session("vzo");
        remote_exec(
            "vzo",
            "CREATE ROLE vzo_owner;
             CREATE TABLE vzo (id int PRIMARY KEY, body text, embedding real[]);
             GRANT SELECT, INSERT, TRIGGER, UPDATE (body, embedding) ON vzo TO vzo_owner;
             SET ROLE vzo_owner;
             SELECT nvembed_create_vectorizer('vzo', 'body', 'embedding');
             INSERT INTO vzo SELECT g, 'owned row ' || g FROM generate_series(1, 4) g;
             RESET ROLE",
        );
        wait_drained("vzo", "'vzo'", 30.0);
        assert_eq!(state("vzo", "vzo", "body", "embedding", "nvembed_passage(body)"), "4,4,0");
        assert_eq!(status("vzo", "vzo", "owner"), "vzo_owner");
        // Without UPDATE on the column any more, its writes fail, visibly, and nothing is written.
        remote_exec(
            "vzo",
            "REVOKE UPDATE (embedding) ON vzo FROM vzo_owner; UPDATE vzo SET body = 'revoked' WHERE id = 2",
        );
        let started = std::time::Instant::now();
        while !status("vzo", "vzo", "last_error").contains("permission denied for table vzo") {
            assert!(seconds(started) < 10.0, "no visible error: {}", status("vzo", "vzo", "last_error"));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(state("vzo", "vzo", "body", "embedding", "nvembed_passage(body)"), "4,3,0");
        // Granted again: the next attempt writes it.
        remote_exec("vzo", "GRANT UPDATE (embedding) ON vzo TO vzo_owner");
        wait_drained("vzo", "'vzo'", 30.0);
        assert_eq!(state("vzo", "vzo", "body", "embedding", "nvembed_passage(body)"), "4,4,0");
        remote_exec("vzo", "SELECT nvembed_drop_vectorizer('vzo', 'embedding'); DROP TABLE vzo; DROP ROLE vzo_owner");
        Spi::run("SELECT dblink_disconnect('vzo')").unwrap();
    }

    #[pg_test]
    fn no_code_of_the_table_or_of_its_roles_runs_as_a_superuser() {
        use_fixture();
        remote_session("vzs");
        // A role owning a table whose key type has its own cast to text, whose trigger records
        // who runs it and tries to leave that role, and whose rows are written by the worker.
        remote_exec(
            "vzs",
            "CREATE ROLE vzs_owner;
             GRANT CREATE ON SCHEMA public TO vzs_owner;
             SET ROLE vzs_owner;
             CREATE TABLE vzs_seen (who text, superuser boolean);
             CREATE TYPE vzs_kind AS ENUM ('a', 'b');
             CREATE FUNCTION vzs_kind_text(vzs_kind) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO vzs_seen VALUES ('cast: ' || current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user));
                   RETURN $1::name::text; END $$;
             CREATE CAST (vzs_kind AS text) WITH FUNCTION vzs_kind_text(vzs_kind);
             CREATE TABLE vzs (kind vzs_kind, id int, body text, embedding real[], PRIMARY KEY (kind, id));
             CREATE FUNCTION vzs_probe() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO vzs_seen VALUES ('trigger: ' || current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user));
               BEGIN
                 RESET ROLE;
                 INSERT INTO vzs_seen VALUES ('reset: ' || current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user));
               EXCEPTION WHEN OTHERS THEN
                 INSERT INTO vzs_seen VALUES ('reset refused: ' || SQLERRM, NULL);
               END;
               RETURN NEW;
             END $$;
             CREATE TRIGGER vzs_probe BEFORE UPDATE OF embedding ON vzs FOR EACH ROW EXECUTE FUNCTION vzs_probe();
             SELECT nvembed_create_vectorizer('vzs', 'body', 'embedding');
             INSERT INTO vzs VALUES ('a', 1, 'first'), ('b', 2, 'second');
             RESET ROLE",
        );
        wait_drained("vzs", "'vzs'", 30.0);
        assert_eq!(state("vzs", "vzs", "body", "embedding", "nvembed_passage(body)"), "2,2,0");
        // The trigger ran as the owner, twice, and could not leave it; the cast never ran (the
        // queue keys come from the type's output function).
        assert_eq!(
            remote_text("vzs", "SELECT string_agg(DISTINCT concat_ws(' ', who, superuser), '; ') FROM vzs_seen"),
            "reset refused: cannot set parameter \"role\" within security-definer function; trigger: vzs_owner f"
        );
        // Nor can the role forge a vectorizer for another role, or queue malformed keys.
        remote_exec("vzs", "SET ROLE vzs_owner");
        for (statement, sqlstate, needle) in [
            (
                "INSERT INTO nvembed_vectorizer (tbl, source_column, target_column, key_columns, kind, instruction, max_length, owner)
                 VALUES ('vzs', 'body', 'embedding', '{kind,id}', 'passage', '', 512, 'postgres')",
                "42501",
                "row-level security",
            ),
            (
                "INSERT INTO nvembed_vectorizer_queue (vectorizer_id, row_key)
                 SELECT id, '{only-one-column}' FROM nvembed_vectorizer WHERE tbl = 'vzs'::regclass",
                "42501",
                "row-level security",
            ),
            (
                "INSERT INTO nvembed_vectorizer_queue (vectorizer_id, row_key)
                 SELECT id, 'not an array' FROM nvembed_vectorizer WHERE tbl = 'vzs'::regclass",
                "22P02",
                "malformed array literal",
            ),
        ] {
            assert_error(
                &format!("PERFORM dblink_exec('vzs', {})", pgrx::spi::quote_literal(statement)),
                sqlstate,
                needle,
            );
        }
        remote_exec("vzs", "RESET ROLE");
        remote_exec(
            "vzs",
            "DROP TABLE vzs, vzs_seen; DROP FUNCTION vzs_probe(); DROP CAST (vzs_kind AS text); DROP FUNCTION vzs_kind_text(vzs_kind);
             DROP TYPE vzs_kind; REVOKE CREATE ON SCHEMA public FROM vzs_owner; DROP ROLE vzs_owner",
        );
        Spi::run("SELECT dblink_disconnect('vzs')").unwrap();
    }

    #[pg_test]
    fn claims_never_overlap_and_a_gone_claimers_rows_are_embedded_once() {
        // Alone, with the worker paused: a claim takes the first due vectorizer's rows, which
        // must be this test's.
        use_fixture_exclusively();
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_databases = ''");
        remote_session("vzc");
        remote_session("vzc_a");
        remote_session("vzc_b");
        let started = std::time::Instant::now();
        while remote_text(
            "vzc",
            "SELECT count(*)::text FROM pg_stat_activity WHERE backend_type = 'nvembed vectorizer'",
        ) != "0"
        {
            assert!(seconds(started) < 10.0, "the vectorizer worker did not stop");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        remote_exec(
            "vzc",
            "CREATE TABLE vzc (id int PRIMARY KEY, body text, embedding real[]);
             CREATE TABLE vzc_writes (id int, body text, embedding real[]);
             CREATE FUNCTION vzc_log() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO vzc_writes VALUES (NEW.id, NEW.body, NEW.embedding); RETURN NEW; END $$;
             CREATE TRIGGER vzc_log AFTER UPDATE OF embedding ON vzc FOR EACH ROW EXECUTE FUNCTION vzc_log();
             SELECT nvembed_create_vectorizer('vzc', 'body', 'embedding');
             INSERT INTO vzc SELECT g, 'claimed row ' || g FROM generate_series(1, 200) g",
        );
        // Two claimers at once, each in an open transaction: SKIP LOCKED keeps them apart.
        remote_exec("vzc_a", "BEGIN");
        remote_exec("vzc_b", "BEGIN");
        let a_keys = remote_text("vzc_a", "SELECT row_keys FROM nvembed_vectorizer_claim(120)");
        let b_keys = remote_text("vzc_b", "SELECT row_keys FROM nvembed_vectorizer_claim(120)");
        let (overlap, total) = Spi::get_two_with_args::<i64, i64>(
            "SELECT (SELECT count(*) FROM (SELECT unnest($1::text[]) INTERSECT SELECT unnest($2::text[])) o),
                    (SELECT count(*) FROM (SELECT unnest($1::text[]) UNION SELECT unnest($2::text[])) u)",
            &[a_keys.as_str().into(), b_keys.as_str().into()],
        )
        .unwrap();
        assert_eq!((overlap, total), (Some(0), Some(200)));
        remote_exec("vzc_a", "COMMIT");
        remote_exec("vzc_b", "COMMIT");
        // A row of a's batch changes while a holds it: its new entry waits for a's claim to
        // settle. a's next batch (a worker claims one per server) takes b's rows, now free
        // (b is no worker), but never that row, which would leave one row in two of a's batches.
        let changed = Spi::get_one_with_args::<String>("SELECT ($1::text[])[1][1]", &[a_keys.as_str().into()])
            .unwrap()
            .unwrap();
        remote_exec("vzc", &format!("UPDATE vzc SET body = body || ' changed' WHERE id = {changed}"));
        let again = remote_text("vzc_a", "SELECT coalesce(row_keys, '{}') FROM nvembed_vectorizer_claim(1000)");
        let (count, holds_changed) = Spi::get_two_with_args::<i64, bool>(
            "SELECT count(*), coalesce(bool_or(k = $2), false) FROM unnest($1::text[]) k",
            &[again.as_str().into(), changed.as_str().into()],
        )
        .unwrap();
        assert_eq!((count, holds_changed), (Some(80), Some(false)), "a's second claim: {again}");
        // Neither claimer is a vectorizer worker: once the worker runs, their claims are free
        // again, and every row is embedded exactly once.
        // (The test configuration is in postgresql.auto.conf, which ALTER SYSTEM rewrites.)
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_databases = 'pgrx_tests'");
        wait_drained("vzc", "'vzc'", 60.0);
        assert_eq!(state("vzc", "vzc", "body", "embedding", "nvembed_passage(body)"), "200,200,0");
        assert_eq!(remote_text("vzc", "SELECT count(*) || ',' || count(DISTINCT id) FROM vzc_writes"), "200,200");
        remote_exec("vzc", "DROP TABLE vzc, vzc_writes; DROP FUNCTION vzc_log()");
        Spi::run("SELECT dblink_disconnect('vzc'), dblink_disconnect('vzc_a'), dblink_disconnect('vzc_b')").unwrap();
    }

    /// "rows, rows holding their own text's passage vector (≤ 1e-6), pending + in_progress" of
    /// vectorized `table`, read in session `name` once its queue is drained.
    fn drained_state(name: &str, table: &str, source: &str, target: &str) -> String {
        wait_drained(name, &format!("'{table}'"), 60.0);
        format!(
            "{},{}",
            remote_text(
                name,
                &format!(
                    "SELECT count(*) || ',' || count(*) FILTER (WHERE (SELECT max(abs(x - y)) FROM unnest({target}::real[], nvembed_passage({source})) u(x, y)) <= 1e-6)
                     FROM {table}"
                )
            ),
            status(name, table, "pending + in_progress")
        )
    }

    #[pg_test]
    fn every_write_path_leaves_each_row_with_the_vector_of_its_text() {
        use_fixture();
        let dim = dimension();
        remote_session("vw");
        remote_exec(
            "vw",
            &format!(
                r#"{VECTOR_EXTENSION};
                   CREATE TABLE vw_keys (id int PRIMARY KEY DEFERRABLE, body text, embedding vector({dim}));
                   CREATE TABLE vw_docs (id int PRIMARY KEY, body text, e real[]);
                   -- A generated source: the vectorizer's AFTER triggers see the stored value.
                   CREATE TABLE vw_generated (id int PRIMARY KEY, title text, content text,
                                              body text GENERATED ALWAYS AS (title || ': ' || content) STORED, e real[]);
                   CREATE TABLE vw_parts (id int, part int, body text, e real[], PRIMARY KEY (part, id) DEFERRABLE) PARTITION BY LIST (part);
                   CREATE TABLE vw_parts_1 PARTITION OF vw_parts FOR VALUES IN (1);
                   CREATE TABLE vw_parts_2 PARTITION OF vw_parts FOR VALUES IN (2);
                   CREATE TABLE vw_parent (id int, body text, e real[]);
                   CREATE TABLE vw_child (PRIMARY KEY (id)) INHERITS (vw_parent);
                   SELECT nvembed_create_vectorizer('vw_keys', 'body', 'embedding');
                   SELECT nvembed_create_vectorizer('vw_docs', 'body', 'e');
                   SELECT nvembed_create_vectorizer('vw_generated', 'body', 'e');
                   SELECT nvembed_create_vectorizer('vw_parts', 'body', 'e');
                   SELECT nvembed_create_vectorizer('vw_child', 'body', 'e');
                   INSERT INTO vw_keys VALUES (1, 'alpha'), (2, 'beta'), (3, 'gamma'), (4, 'delta');
                   INSERT INTO vw_docs VALUES (1, 'first'), (2, 'second'), (3, 'third');
                   INSERT INTO vw_generated VALUES (1, 'a title', 'some content'), (2, 'other title', 'more content');
                   INSERT INTO vw_parts VALUES (1, 1, 'one'), (2, 1, 'two'), (1, 2, 'uno'), (2, 2, 'dos');
                   INSERT INTO vw_child VALUES (1, 'child one'), (2, 'child two');
                   DO $$ BEGIN END $$"#
            ),
        );
        for (table, target) in [
            ("vw_keys", "embedding"),
            ("vw_docs", "e"),
            ("vw_parts", "e"),
            ("vw_child", "e"),
        ] {
            let rows = remote_text("vw", &format!("SELECT count(*)::text FROM {table}"));
            assert_eq!(
                drained_state("vw", table, "body", target),
                format!("{rows},{rows},0"),
                "{table} after the inserts"
            );
        }
        remote_exec(
            "vw",
            r#"-- Keys and texts changed by one statement: rows move onto keys other rows held.
               UPDATE vw_keys SET id = id + 1, body = upper(body);
               -- Two rows swap keys, one of them with a new text.
               UPDATE vw_keys SET id = 7 - id, body = CASE id WHEN 2 THEN 'swapped' ELSE body END WHERE id IN (2, 5);
               -- A key change alone: the row's text changed just before, and is not embedded yet.
               UPDATE vw_keys SET id = 10 WHERE id = 3;
               INSERT INTO vw_docs VALUES (1, 'first, upserted'), (9, 'new, upserted')
                   ON CONFLICT (id) DO UPDATE SET body = excluded.body;
               MERGE INTO vw_docs d USING (VALUES (2, 'second, merged'), (3, NULL), (10, 'new, merged')) AS s(id, body) ON d.id = s.id
                   WHEN MATCHED AND s.body IS NULL THEN DELETE
                   WHEN MATCHED THEN UPDATE SET body = s.body
                   WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.body);
               -- Rows moved between partitions, and two that swap partitions (and keys).
               UPDATE vw_parts SET part = 2, id = 3, body = 'two, moved' WHERE part = 1 AND id = 2;
               UPDATE vw_parts SET part = 3 - part, body = body || ', swapped' WHERE id = 1;
               UPDATE vw_generated SET content = 'changed content' WHERE id = 1;
               UPDATE vw_generated SET id = 3 WHERE id = 2;
               -- An inheritance child's rows, written through its parent.
               UPDATE vw_parent SET body = 'child one, through the parent' WHERE id = 1"#,
        );
        assert_eq!(drained_state("vw", "vw_keys", "body", "embedding"), "4,4,0");
        assert_eq!(
            remote_text(
                "vw",
                "SELECT string_agg(id || ':' || body, ' ' ORDER BY id) FROM vw_keys"
            ),
            "2:DELTA 4:GAMMA 5:swapped 10:BETA"
        );
        assert_eq!(drained_state("vw", "vw_docs", "body", "e"), "4,4,0");
        assert_eq!(drained_state("vw", "vw_parts", "body", "e"), "4,4,0");
        assert_eq!(
            remote_text(
                "vw",
                "SELECT string_agg(part || '/' || id || ':' || body, ' ' ORDER BY part, id) FROM vw_parts"
            ),
            "1/1:uno, swapped 2/1:one, swapped 2/2:dos 2/3:two, moved"
        );
        assert_eq!(drained_state("vw", "vw_child", "body", "e"), "2,2,0");
        assert_eq!(drained_state("vw", "vw_generated", "body", "e"), "2,2,0");
        remote_exec("vw", "DROP TABLE vw_keys, vw_docs, vw_generated, vw_parts, vw_parent CASCADE");
        Spi::run("SELECT dblink_disconnect('vw')").unwrap();
    }

    #[pg_test]
    fn tables_a_vectorizer_would_miss_rows_of_are_refused() {
        use_fixture();
        Spi::run(
            "CREATE TABLE vrp (id int, part int, body text, e real[], PRIMARY KEY (part, id)) PARTITION BY LIST (part);
             CREATE TABLE vrp_1 PARTITION OF vrp FOR VALUES IN (1);
             CREATE TABLE vrp_parent (id int PRIMARY KEY, body text, e real[]);
             CREATE TABLE vrp_child () INHERITS (vrp_parent);
             CREATE TABLE vrp_alone (id int PRIMARY KEY, body text, e real[]);
             CREATE TABLE vrp_other (id int PRIMARY KEY, body text, e real[]);
             CREATE TABLE vrp_loose (id int, part int, body text, e real[], PRIMARY KEY (part, id));",
        )
        .unwrap();
        assert_error(
            "PERFORM nvembed_create_vectorizer('vrp_1', 'body', 'e')",
            "42809",
            "vrp_1 is a partition of public.vrp",
        );
        assert_error(
            "PERFORM nvembed_create_vectorizer('vrp_parent', 'body', 'e')",
            "42809",
            "vrp_parent has inheritance children",
        );
        // Nor may a vectorized table become either later.
        Spi::run("SELECT nvembed_create_vectorizer('vrp_alone', 'body', 'e'), nvembed_create_vectorizer('vrp_loose', 'body', 'e')")
            .unwrap();
        assert_error(
            "CREATE TABLE vrp_alone_child () INHERITS (vrp_alone)",
            "55000",
            "vrp_alone has a vectorizer: it cannot have inheritance children",
        );
        assert_error(
            "ALTER TABLE vrp_other INHERIT vrp_alone",
            "55000",
            "cannot have inheritance children",
        );
        assert_error(
            "ALTER TABLE vrp ATTACH PARTITION vrp_loose FOR VALUES IN (2)",
            "55000",
            "vrp_loose has a vectorizer: it cannot become a partition",
        );
    }

    #[pg_test]
    fn renamed_columns_are_followed_and_the_table_stays_writable() {
        use_fixture();
        remote_session("vrn");
        remote_exec(
            "vrn",
            "CREATE TABLE vrn (id int PRIMARY KEY, body text, e real[]);
             SELECT nvembed_create_vectorizer('vrn', 'body', 'e');
             INSERT INTO vrn VALUES (1, 'before the renames');
             ALTER TABLE vrn RENAME COLUMN body TO content;
             ALTER TABLE vrn RENAME COLUMN e TO embedding;
             ALTER TABLE vrn RENAME COLUMN id TO doc_id;
             INSERT INTO vrn VALUES (2, 'after the renames');
             UPDATE vrn SET content = 'changed after the renames' WHERE doc_id = 1",
        );
        assert_eq!(drained_state("vrn", "vrn", "content", "embedding"), "2,2,0");
        assert_eq!(
            status("vrn", "vrn", "source_column, target_column, last_error IS NULL"),
            "content,embedding,t"
        );
        remote_exec("vrn", "DROP TABLE vrn");
        Spi::run("SELECT dblink_disconnect('vrn')").unwrap();
    }

    #[pg_test]
    fn the_views_show_only_rows_that_row_level_security_shows() {
        use_fixture();
        remote_session("vrl");
        remote_exec(
            "vrl",
            "CREATE TABLE vrl (email text PRIMARY KEY, tenant name NOT NULL, body text, e real[]);
             ALTER TABLE vrl ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own_rows ON vrl USING (tenant = current_user);
             CREATE ROLE vrl_a; CREATE ROLE vrl_b; CREATE ROLE vrl_none;
             GRANT SELECT, INSERT, UPDATE ON vrl TO vrl_a, vrl_b;
             SELECT nvembed_create_vectorizer('vrl', 'body', 'e');
             -- Failures and queue entries written as the worker would.
             INSERT INTO nvembed_vectorizer_failure
             SELECT v.id, k, 3, 'failed for ' || k, now() FROM nvembed_vectorizer v,
                    unnest(ARRAY['{a@example.com}', '{b@example.com}']) AS k WHERE v.tbl = 'vrl'::regclass;
             -- (Not due: the worker must leave it there.)
             INSERT INTO nvembed_vectorizer_queue (vectorizer_id, row_key, last_error, last_attempt_at, next_attempt_at)
             SELECT v.id, '{b2@example.com}', 'queued for b2', now() + interval '1 s', 'infinity'
             FROM nvembed_vectorizer v WHERE v.tbl = 'vrl'::regclass;
             INSERT INTO vrl VALUES ('a@example.com', 'vrl_a', NULL), ('b@example.com', 'vrl_b', NULL), ('b2@example.com', 'vrl_b', NULL)",
        );
        let seen = |role: &str| {
            remote_text(
                "vrl",
                &format!(
                    "SET ROLE {role};
                     SELECT (SELECT coalesce(string_agg(row_key[1] || '=' || last_error, ' ' ORDER BY row_key), '-')
                             FROM nvembed_vectorizer_failures WHERE tbl = 'vrl'::regclass)
                            || ' / ' || (SELECT concat_ws(',', failed, pending + in_progress, coalesce(last_error, '-'))
                                         FROM nvembed_vectorizer_status WHERE tbl = 'vrl'::regclass)"
                ),
            )
        };
        assert_eq!(
            seen("vrl_a"),
            "a@example.com=failed for {a@example.com} / 1,0,failed for {a@example.com}"
        );
        assert_eq!(
            seen("vrl_b"),
            "b@example.com=failed for {b@example.com} / 1,1,queued for b2"
        );
        // Any role may call nvembed_vectorizer_set_firing: with the triggers set it changes and
        // locks nothing, and never re-enables what the owner disabled; the owner's ENABLE
        // TRIGGER ALL (origin mode only) is put right at once.
        let id = remote_text("vrl", "RESET ROLE; SELECT id::text FROM nvembed_vectorizer WHERE tbl = 'vrl'::regclass");
        let firing = "SELECT string_agg(tgname || '=' || tgenabled::text, ' ' ORDER BY tgname) FROM pg_trigger
                      WHERE tgrelid = 'vrl'::regclass AND tgname LIKE 'nvembed\\_%'";
        remote_exec("vrl", "ALTER TABLE vrl DISABLE TRIGGER ALL");
        remote_exec("vrl", "SET ROLE vrl_none; BEGIN");
        remote_text("vrl", &format!("SELECT nvembed_vectorizer_set_firing({id})::text"));
        let pid = remote_text("vrl", "SELECT pg_backend_pid()::text");
        assert_eq!(
            Spi::get_one::<i64>(&format!("SELECT count(*) FROM pg_locks WHERE relation = 'vrl'::regclass AND pid = {pid}"))
                .unwrap(),
            Some(0)
        );
        remote_exec("vrl", "ROLLBACK; RESET ROLE");
        let disabled = remote_text("vrl", firing);
        assert!(!disabled.contains("=A") && !disabled.contains("=R") && !disabled.contains("=O"), "{disabled}");
        remote_exec("vrl", "ALTER TABLE vrl ENABLE TRIGGER ALL");
        assert_eq!(
            remote_text("vrl", firing),
            format!(
                "nvembed_vectorizer_{id}_insert=O nvembed_vectorizer_{id}_rekey=A nvembed_vectorizer_{id}_replica_insert=R nvembed_vectorizer_{id}_update=A"
            )
        );
        // A role that may not read the table does not see its vectorizer at all.
        assert_eq!(
            remote_text(
                "vrl",
                "SET ROLE vrl_none; SELECT count(*)::text FROM nvembed_vectorizer WHERE tbl = 'vrl'::regclass"
            ),
            "0"
        );
        remote_exec(
            "vrl",
            "RESET ROLE; SELECT nvembed_drop_vectorizer('vrl', 'e'); DROP TABLE vrl; DROP ROLE vrl_a, vrl_b, vrl_none",
        );
        Spi::run("SELECT dblink_disconnect('vrl')").unwrap();
    }
}
