//! SQL-level tests of chunks: `nvembed_chunks`, and chunk vectorizers kept in step with their
//! rows through every write path (drained by the test database's vectorizer worker; tables it
//! must see are made in dblink sessions, as in `vectorizer_tests`).

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::sql_tests::tests::{
        alter_system, assert_error, remote_exec, remote_session, remote_text, seconds, use_fixture, use_fixture_exclusively,
    };

    /// pgvector, committed by whichever test gets there first.
    const VECTOR_EXTENSION: &str =
        "DO $$ BEGIN CREATE EXTENSION IF NOT EXISTS vector; EXCEPTION WHEN unique_violation THEN NULL; END $$";

    /// A document of `paragraphs` paragraphs of a few sentences, all different.
    fn document(seed: i32, paragraphs: i32) -> String {
        (0..paragraphs)
            .map(|p| {
                format!(
                    "Section {seed}.{p} covers vacuum and the visibility map. Dead tuples of table {seed}.{p} wait for it. \
                     Index entries {seed}.{p} point at them until then."
                )
            })
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    #[pg_test]
    fn chunks_are_pieces_of_the_text_that_each_fit_and_cover_it_in_order() {
        use_fixture();
        let doc = document(1, 12);
        let rows = Spi::get_one_with_args::<String>(
            "SELECT string_agg(chunk_seq || ':' || (position(chunk in $1) > 0) || ':' || (chunk = btrim(chunk, E' \\n')), ' ' ORDER BY chunk_seq)
             FROM nvembed_chunks($1, 40, 8)",
            &[doc.as_str().into()],
        )
        .unwrap()
        .unwrap();
        let n = rows.split(' ').count();
        assert!(n >= 4, "{rows}");
        let want: Vec<String> = (1..=n).map(|i| format!("{i}:true:true")).collect();
        assert_eq!(rows, want.join(" "));
        // Each chunk fits: cut again with the same budget, it is its own only chunk; chunks
        // start in order, and neighbours overlap.
        let checks = Spi::get_one_with_args::<String>(
            "WITH c AS (SELECT chunk_seq, chunk, position(chunk in $1) AS at FROM nvembed_chunks($1, 40, 8))
             SELECT (SELECT bool_and((SELECT array_agg(x.chunk) FROM nvembed_chunks(c.chunk, 40, 8) x) = ARRAY[c.chunk]) FROM c)
                    || ',' || (SELECT bool_and(at < lead_at) FROM (SELECT at, lead(at) OVER (ORDER BY chunk_seq) AS lead_at FROM c) s WHERE lead_at IS NOT NULL)
                    || ',' || (SELECT bool_and(at + length(chunk) > lead_at)
                               FROM (SELECT at, chunk, lead(at) OVER (ORDER BY chunk_seq) AS lead_at FROM c) s WHERE lead_at IS NOT NULL)",
            &[doc.as_str().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(checks, "true,true,true");
        // Without overlap, paragraphs stay whole where they fit.
        let ends = Spi::get_one_with_args::<bool>(
            "SELECT bool_and(chunk LIKE 'Section%' AND chunk LIKE '%then.') FROM nvembed_chunks($1, 100, 0)",
            &[doc.as_str().into()],
        )
        .unwrap();
        assert_eq!(ends, Some(true));
        // A short text is one chunk, trimmed; blank and NULL texts have none; the defaults apply.
        assert_eq!(
            Spi::get_one::<String>("SELECT string_agg(chunk_seq || '=' || chunk, '|') FROM nvembed_chunks(E'  one line \\n')").unwrap(),
            Some("1=one line".into())
        );
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM nvembed_chunks(E' \\n\\t ')").unwrap(), Some(0));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM nvembed_chunks(NULL)").unwrap(), Some(0));
        assert_eq!(
            Spi::get_one::<String>("SELECT max_tokens || ',' || overlap FROM nvembed_chunk_settings(NULL, NULL)").unwrap(),
            Some(format!("{},{}", nvembed_protocol::DEFAULT_CHUNK_TOKENS, nvembed_protocol::DEFAULT_CHUNK_OVERLAP))
        );
        // A query's chunks leave room for the instruction: fewer text tokens each.
        let (passages, queries) = Spi::get_two_with_args::<i64, i64>(
            "SELECT (SELECT count(*) FROM nvembed_chunks($1, 80, 0)), (SELECT count(*) FROM nvembed_chunks($1, 80, 0, 'query'))",
            &[doc.as_str().into()],
        )
        .unwrap();
        assert!(queries.unwrap() > passages.unwrap(), "{queries:?} query chunks, {passages:?} passage chunks");
        // Bad input.
        assert_error("PERFORM nvembed_chunks('x', 0)", "22023", "max_tokens must be between 1 and");
        assert_error("PERFORM nvembed_chunks('x', 40, 40)", "22023", "overlap must be at least 0 and less than max_tokens (40)");
        assert_error("PERFORM nvembed_chunks('x', 40, -1)", "22023", "overlap must be");
        assert_error("PERFORM nvembed_chunks('x', 40, 0, 'document')", "22023", "kind must be 'passage' or 'query', not 'document'");
        assert_error("PERFORM nvembed_chunks('x', 8, 0, 'query')", "22023", "has no room for text: the instruction takes");
        assert_error("PERFORM nvembed_chunks('x', 40, 20)", "22023", "an overlap of 20 tokens is more than half of the 38 tokens");
        assert_error("PERFORM nvembed_chunks('x', 17, 0)", "22023", "at least 16 tokens of text");
    }

    /// Waits until no entry of the vectorizer filling `chunk_table` is pending or in progress.
    fn wait_drained(session: &str, chunk_table: &str) {
        let started = std::time::Instant::now();
        let query = format!(
            "SELECT (pending + in_progress)::text FROM nvembed_vectorizer_status WHERE chunk_table = '{chunk_table}'::regclass"
        );
        while remote_text(session, &query) != "0" {
            assert!(seconds(started) < 90.0, "{chunk_table} not drained: {}", remote_text(session, &query));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// "rows, rows whose chunks are exactly nvembed_chunks(text) in order, chunks, chunks whose
    /// embedding is nvembed_passage(chunk)" of `table` (key `key`) and `chunk_table`.
    fn chunk_state(session: &str, table: &str, key: &str, chunk_table: &str, max_tokens: i32, overlap: i32) -> String {
        wait_drained(session, chunk_table);
        remote_text(
            session,
            &format!(
                "SELECT (SELECT count(*) || ',' || count(*) FILTER (WHERE ok) FROM
                           (SELECT (SELECT array_agg(c.chunk_seq || ':' || c.chunk ORDER BY c.chunk_seq) FROM {chunk_table} c WHERE {join})
                                   IS NOT DISTINCT FROM
                                   (SELECT array_agg(x.chunk_seq || ':' || x.chunk ORDER BY x.chunk_seq)
                                    FROM nvembed_chunks(d.body, {max_tokens}, {overlap}) x) AS ok
                            FROM {table} d) s)
                        || ',' || (SELECT count(*) || ',' || count(*) FILTER (WHERE
                                     (SELECT max(abs(x - y)) FROM unnest(c.embedding::real[], nvembed_passage(c.chunk)) u(x, y)) <= 1e-6)
                                   FROM {chunk_table} c)",
                join = key
                    .split(',')
                    .map(|k| format!("c.{k} = d.{k}"))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            ),
        )
    }

    #[pg_test]
    fn chunk_tables_stay_exactly_in_step_with_their_rows_through_every_write_path() {
        use_fixture();
        remote_session("ck");
        let docs: Vec<String> = (1..=6).map(|i| document(i, 1 + i % 4)).collect();
        remote_exec(
            "ck",
            &format!(
                r#"{VECTOR_EXTENSION};
                   CREATE TABLE ck_docs (id int PRIMARY KEY, title text, body text);
                   CREATE TABLE ck_parts (id int, part int, body text, PRIMARY KEY (part, id)) PARTITION BY LIST (part);
                   CREATE TABLE ck_parts_1 PARTITION OF ck_parts FOR VALUES IN (1);
                   CREATE TABLE ck_parts_2 PARTITION OF ck_parts FOR VALUES IN (2);
                   INSERT INTO ck_docs SELECT g, 'existing ' || g, (ARRAY[{}])[g] FROM generate_series(1, 6) g;
                   SELECT nvembed_create_chunk_vectorizer('ck_docs', 'body', 'ck_chunks', 32, 6);
                   SELECT nvembed_create_chunk_vectorizer('ck_parts', 'body', 'ck_part_chunks', 40, 0);
                   DO $$ BEGIN END $$"#,
                docs.iter().map(|d| pgrx::spi::quote_literal(d)).collect::<Vec<_>>().join(", ")
            ),
        );
        // The chunk table: the key, chunk_seq, chunk and a vector of the model's dimension.
        assert_eq!(
            remote_text(
                "ck",
                "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
                 FROM pg_attribute WHERE attrelid = 'ck_chunks'::regclass AND attnum > 0"
            ),
            format!(
                "id integer, chunk_seq integer, chunk text, embedding vector({})",
                Spi::get_one::<i32>("SELECT array_length(nvembed_passage('d'), 1)").unwrap().unwrap()
            )
        );
        // Existing rows are the backfill.
        assert_eq!(chunk_state("ck", "ck_docs", "id", "ck_chunks", 32, 6), {
            let chunks = remote_text("ck", "SELECT count(*)::text FROM ck_chunks");
            assert!(chunks.parse::<i64>().unwrap() > 12, "{chunks} chunks");
            format!("6,6,{chunks},{chunks}")
        });
        remote_exec(
            "ck",
            &format!(
                r#"INSERT INTO ck_docs VALUES (7, 't', {d7}), (8, 't', NULL), (9, 't', ''), (10, 't', 'short');
                   UPDATE ck_docs SET body = body || ' An appended sentence.' WHERE id = 1;
                   UPDATE ck_docs SET title = 'title only' WHERE id = 2;
                   UPDATE ck_docs SET body = NULL WHERE id = 3;
                   DELETE FROM ck_docs WHERE id = 4;
                   UPDATE ck_docs SET id = 40 WHERE id = 5;
                   INSERT INTO ck_docs VALUES (6, 't', 'upserted text'), (11, 't', 'new, upserted')
                       ON CONFLICT (id) DO UPDATE SET body = excluded.body;
                   MERGE INTO ck_docs d USING (VALUES (7, 'merged text'), (10, NULL), (12, 'new, merged')) AS s(id, body) ON d.id = s.id
                       WHEN MATCHED AND s.body IS NULL THEN DELETE
                       WHEN MATCHED THEN UPDATE SET body = s.body
                       WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'm', s.body);
                   INSERT INTO ck_parts SELECT g, 1 + g % 2, (ARRAY[{all}])[g] FROM generate_series(1, 6) g"#,
                d7 = pgrx::spi::quote_literal(&document(7, 3)),
                all = docs.iter().map(|d| pgrx::spi::quote_literal(d)).collect::<Vec<_>>().join(", ")
            ),
        );
        // A rolled-back change leaves the chunks, and queues nothing.
        remote_exec("ck", "BEGIN");
        remote_exec("ck", "UPDATE ck_docs SET body = 'rolled back' WHERE id = 1");
        remote_exec("ck", "DELETE FROM ck_docs WHERE id = 2");
        remote_exec("ck", "ROLLBACK");
        let state = chunk_state("ck", "ck_docs", "id", "ck_chunks", 32, 6);
        let chunks = remote_text("ck", "SELECT count(*)::text FROM ck_chunks");
        assert_eq!(state, format!("10,10,{chunks},{chunks}"));
        assert_eq!(
            remote_text(
                "ck",
                "SELECT string_agg(DISTINCT id::text, ' ' ORDER BY id::text) FROM ck_chunks WHERE id IN (3, 4, 5, 8, 9, 10, 40)"
            ),
            "40"
        );
        assert_eq!(remote_text("ck", "SELECT string_agg(chunk, '|') FROM ck_chunks WHERE id = 11"), "new, upserted");
        // Partitions: rows moved between them (and their keys with them), a partition written directly.
        remote_exec(
            "ck",
            r#"UPDATE ck_parts SET part = 2 WHERE id = 1;
               UPDATE ck_parts SET part = 3 - part, body = body || ' Swapped.' WHERE id IN (2, 3);
               INSERT INTO ck_parts_1 VALUES (20, 1, 'written to a partition directly');
               DELETE FROM ck_parts WHERE id = 4;
               -- A table attached as a partition, with the rows it already holds.
               CREATE TABLE ck_parts_3 (LIKE ck_parts);
               INSERT INTO ck_parts_3 VALUES (30, 3, 'attached with its rows'), (31, 3, 'another row attached');
               ALTER TABLE ck_parts ATTACH PARTITION ck_parts_3 FOR VALUES IN (3)"#,
        );
        let state = chunk_state("ck", "ck_parts", "part,id", "ck_part_chunks", 40, 0);
        let chunks = remote_text("ck", "SELECT count(*)::text FROM ck_part_chunks");
        assert_eq!(state, format!("8,8,{chunks},{chunks}"));
        // No chunk without its row, none twice.
        assert_eq!(
            remote_text(
                "ck",
                "SELECT (SELECT count(*) FROM ck_chunks c WHERE NOT EXISTS (SELECT 1 FROM ck_docs d WHERE d.id = c.id))
                        || ',' || (SELECT count(*) - count(DISTINCT (id, chunk_seq)) FROM ck_chunks)"
            ),
            "0,0"
        );
        // A key column renamed on the table (the chunk table's keeps its name): still paired.
        remote_exec("ck", "ALTER TABLE ck_docs RENAME COLUMN id TO doc_id");
        remote_exec("ck", "UPDATE ck_docs SET body = 'renamed key, new text' WHERE doc_id = 11");
        wait_drained("ck", "ck_chunks");
        assert_eq!(remote_text("ck", "SELECT string_agg(chunk, '|') FROM ck_chunks WHERE id = 11"), "renamed key, new text");
        remote_exec("ck", "ALTER TABLE ck_docs RENAME COLUMN doc_id TO id");
        // The status view names the chunk table; dropping it drops the vectorizer.
        assert_eq!(
            remote_text(
                "ck",
                "SELECT concat_ws(',', tbl, source_column, coalesce(target_column, '-'), chunk_table, failed) FROM nvembed_vectorizer_status WHERE tbl = 'ck_docs'::regclass"
            ),
            "ck_docs,body,-,ck_chunks,0"
        );
        remote_exec("ck", "DROP TABLE ck_chunks");
        assert_eq!(
            remote_text("ck", "SELECT count(*)::text FROM nvembed_vectorizer_status WHERE tbl = 'ck_docs'::regclass"),
            "0"
        );
        remote_exec("ck", "DO $$ BEGIN PERFORM nvembed_drop_vectorizer('ck_part_chunks'); END $$");
        assert_eq!(remote_text("ck", "SELECT (count(*) > 0)::text FROM ck_part_chunks"), "true");
        remote_exec("ck", "DROP TABLE ck_docs, ck_parts, ck_part_chunks");
        Spi::run("SELECT dblink_disconnect('ck')").unwrap();
    }

    #[pg_test]
    fn documents_are_found_by_their_best_chunk_as_an_exact_search_finds_them() {
        use_fixture();
        remote_session("cs");
        remote_exec(
            "cs",
            &format!(
                r#"{VECTOR_EXTENSION};
                   CREATE TABLE cs_docs (id int PRIMARY KEY, lang text, body text);
                   -- Row 1's many chunks are all alike: they crowd the best chunks of a search.
                   INSERT INTO cs_docs VALUES (1, 'en', repeat('How does autovacuum decide when to run? ', 60));
                   INSERT INTO cs_docs SELECT g, CASE WHEN g % 2 = 0 THEN 'en' ELSE 'fr' END,
                                              'Document ' || g || '. ' || repeat('Topic ' || (g % 5) || ' about table number ' || g || '. ', 8)
                                       FROM generate_series(2, 25) g;
                   SELECT nvembed_create_chunk_vectorizer('cs_docs', 'body', 'cs_chunks', 24, 4);
                   DO $$ BEGIN END $$"#
            ),
        );
        wait_drained("cs", "cs_chunks");
        assert!(remote_text("cs", "SELECT count(*)::text FROM cs_chunks WHERE id = 1").parse::<i64>().unwrap() > 40);
        let query = "How does autovacuum decide when to run?";
        // "id:chunk_seq" of the exact best chunk of each row, the k best rows.
        let exact = |k: i32, filter: &str| {
            remote_text(
                "cs",
                &format!(
                    "SELECT string_agg(id || ':' || chunk_seq, ' ' ORDER BY s DESC, id) FROM (
                       SELECT DISTINCT ON (c.id) c.id, c.chunk_seq, -(c.embedding <#> nvembed_query('{query}')::vector) AS s
                       FROM cs_chunks c JOIN cs_docs d ON d.id = c.id WHERE {filter}
                       ORDER BY c.id, s DESC, c.chunk_seq LIMIT ALL) b
"
                ),
            )
            .split(' ')
            .take(k as usize)
            .collect::<Vec<_>>()
            .join(" ")
        };
        let found = |k: i32, filter: &str, extra: &str| {
            remote_text(
                "cs",
                &format!(
                    "SELECT string_agg((item).id || ':' || chunk_seq, ' ' ORDER BY n) FROM
                     nvembed_search_documents(NULL::cs_docs, '{query}', k => {k}, filter => {filter}{extra}) WITH ORDINALITY AS s(item, chunk, chunk_seq, score, n)"
                ),
            )
        };
        for index in [false, true] {
            if index {
                remote_exec("cs", "DO $$ BEGIN PERFORM nvembed_create_search_index('cs_chunks'); END $$");
            }
            for k in [1, 3, 8] {
                assert_eq!(found(k, "NULL", ""), exact(k, "true"), "k {k}, index {index}");
            }
            assert_eq!(found(4, "$f$cs_docs.lang = 'fr'$f$", ""), exact(4, "d.lang = 'fr'"), "index {index}");
            assert_eq!(found(4, "$f$lang = 'en' AND id > 10$f$", ", candidates => 500"), exact(4, "d.lang = 'en' AND d.id > 10"));
        }
        // More rows asked for than the table has: every row, once.
        assert_eq!(found(100, "NULL", "").split(' ').count(), 25);
        // Each row comes back whole, with its best chunk's text and score.
        assert_eq!(
            remote_text(
                "cs",
                &format!(
                    "SELECT ((item).body LIKE '%' || chunk || '%')::text || ',' || (abs(score + (SELECT c.embedding <#> nvembed_query('{query}')::vector
                             FROM cs_chunks c WHERE c.id = (item).id AND c.chunk_seq = s.chunk_seq)) < 1e-6)::text
                     FROM nvembed_search_documents(NULL::cs_docs, '{query}', k => 1) s"
                )
            ),
            "true,true"
        );
        remote_exec(
            "cs",
            "DO $t$ BEGIN
               PERFORM nvembed_search_documents(NULL::cs_chunks, 'x');
             EXCEPTION WHEN undefined_object THEN
               IF SQLERRM <> 'nvembed_search_documents: no chunk vectorizer fills a chunk table of public.cs_chunks' THEN RAISE; END IF;
             END $t$",
        );
        // A second chunk table: which one to search must be named.
        remote_exec("cs", "SELECT nvembed_create_chunk_vectorizer('cs_docs', 'body', 'cs_chunks_2', 64, 0); DO $$ BEGIN END $$");
        remote_exec(
            "cs",
            "DO $t$ BEGIN
               PERFORM nvembed_search_documents(NULL::cs_docs, 'x');
               RAISE EXCEPTION 'no error';
             EXCEPTION WHEN ambiguous_parameter THEN
               IF SQLERRM <> 'nvembed_search_documents: public.cs_docs has 2 chunk tables' THEN RAISE; END IF;
             END $t$",
        );
        assert_eq!(found(3, "NULL", ", chunk_table => 'cs_chunks'"), exact(3, "true"));
        remote_exec("cs", "DROP TABLE cs_chunks, cs_chunks_2, cs_docs");
        Spi::run("SELECT dblink_disconnect('cs')").unwrap();
    }

    #[pg_test]
    fn a_text_changed_by_a_transaction_open_across_a_claim_is_cut_again() {
        // Alone, with the worker paused until the change is made.
        use_fixture_exclusively();
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_databases = ''");
        remote_session("cr");
        remote_session("cr_writer");
        let started = std::time::Instant::now();
        while remote_text("cr", "SELECT count(*)::text FROM pg_stat_activity WHERE backend_type = 'nvembed vectorizer'") != "0" {
            assert!(seconds(started) < 10.0, "the vectorizer worker did not stop");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        remote_exec(
            "cr",
            &format!(
                "{VECTOR_EXTENSION};
                 CREATE TABLE cr_docs (id int PRIMARY KEY, body text);
                 SELECT nvembed_create_chunk_vectorizer('cr_docs', 'body', 'cr_chunks', 32, 0);
                 INSERT INTO cr_docs VALUES (1, 'the first text')"
            ),
        );
        // The row's entry waits; a writer changes its text and stays open across the claim.
        remote_exec("cr_writer", "BEGIN");
        remote_exec("cr_writer", "UPDATE cr_docs SET body = 'the second text' WHERE id = 1");
        alter_system("ALTER SYSTEM SET nvembed.vectorizer_databases = 'pgrx_tests'");
        // The worker reads the committed (first) text and writes its chunks.
        let started = std::time::Instant::now();
        while remote_text("cr", "SELECT coalesce(string_agg(chunk, '|'), '') FROM cr_chunks") != "the first text" {
            assert!(seconds(started) < 60.0, "the first text's chunks were not written");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        remote_exec("cr_writer", "COMMIT");
        wait_drained("cr", "cr_chunks");
        assert_eq!(remote_text("cr", "SELECT string_agg(chunk_seq || ':' || chunk, '|') FROM cr_chunks"), "1:the second text");
        remote_exec("cr", "DROP TABLE cr_chunks, cr_docs");
        Spi::run("SELECT dblink_disconnect('cr'), dblink_disconnect('cr_writer')").unwrap();
    }

    #[pg_test]
    fn a_row_hidden_from_the_owner_by_row_level_security_loses_its_chunks() {
        use_fixture();
        remote_session("cl");
        remote_exec(
            "cl",
            &format!(
                "{VECTOR_EXTENSION};
                 CREATE ROLE cl_owner;
                 GRANT CREATE ON SCHEMA public TO cl_owner;
                 SET ROLE cl_owner;
                 CREATE TABLE cl_docs (id int PRIMARY KEY, body text, tenant text);
                 ALTER TABLE cl_docs ENABLE ROW LEVEL SECURITY;
                 ALTER TABLE cl_docs FORCE ROW LEVEL SECURITY;
                 CREATE POLICY visible ON cl_docs USING (tenant = 't');
                 INSERT INTO cl_docs SELECT g, 'text of row ' || g, 't' FROM generate_series(1, 5) g;
                 SELECT nvembed_create_chunk_vectorizer('cl_docs', 'body', 'cl_chunks', 32, 0);
                 RESET ROLE"
            ),
        );
        wait_drained("cl", "cl_chunks");
        assert_eq!(remote_text("cl", "SELECT count(*)::text FROM cl_chunks"), "5");
        // Changed by a superuser so that the owner no longer sees it: its old text's chunks go.
        remote_exec("cl", "UPDATE cl_docs SET tenant = 'hidden', body = 'a text the owner may not see' WHERE id = 1");
        wait_drained("cl", "cl_chunks");
        assert_eq!(remote_text("cl", "SELECT string_agg(id::text, ',' ORDER BY id) FROM cl_chunks"), "2,3,4,5");
        remote_exec("cl", "DROP TABLE cl_chunks, cl_docs; REVOKE CREATE ON SCHEMA public FROM cl_owner; DROP ROLE cl_owner");
        Spi::run("SELECT dblink_disconnect('cl')").unwrap();
    }

    #[pg_test]
    fn creating_a_chunk_vectorizer_refuses_what_it_cannot_keep_in_step() {
        use_fixture();
        Spi::run(VECTOR_EXTENSION).unwrap();
        Spi::run(
            "CREATE TABLE cb_docs (id int PRIMARY KEY, body text);
             CREATE TABLE cb_taken (x int);
             CREATE TABLE cb_nokey (body text);
             CREATE TABLE cb_deferred (id int PRIMARY KEY DEFERRABLE, body text);
             CREATE TABLE cb_clash (chunk int PRIMARY KEY, body text);
             CREATE VIEW cb_view AS SELECT * FROM cb_docs",
        )
        .unwrap();
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_taken')", "42P07", "relation public.cb_taken already exists");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_docs')", "42P07", "already exists");
        assert_error(
            "PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_c', 5, 0, 'query')",
            "22023",
            "has no room for text: the instruction takes",
        );
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_c', 0)", "22023", "max_tokens must be between 1");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_c', 64, 64)", "22023", "overlap must be");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_c', 64, 0, 'doc')", "22023", "kind must be");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'nope', 'cb_c')", "42703", "column nope of relation public.cb_docs does not exist");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_nokey', 'body', 'cb_c')", "55000", "has no primary key");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_deferred', 'body', 'cb_c')", "55000", "primary key of public.cb_deferred is deferrable");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_clash', 'body', 'cb_c')", "42701", "has a column named chunk");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_view', 'body', 'cb_c')", "42809", "is not a table");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'a.b.c')", "42602", "improper chunk table name");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', '')", "42602", "improper chunk table name");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'pg_temp.c')", "0A000", "a chunk table cannot be temporary");
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_nowhere.c')", "3F000", "schema cb_nowhere does not exist");
        Spi::run("CREATE ROLE cb_reader; GRANT SELECT ON cb_docs TO cb_reader; GRANT CREATE ON SCHEMA public TO cb_reader").unwrap();
        Spi::run("SET ROLE cb_reader").unwrap();
        assert_error("PERFORM nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_c')", "42501", "permission denied to reference the primary key of public.cb_docs");
        Spi::run("RESET ROLE").unwrap();
        assert_error("PERFORM nvembed_drop_vectorizer('cb_taken'::regclass)", "42704", "no vectorizer fills public.cb_taken");
        // None of the refusals left a chunk table behind; a good call makes one, in the
        // table's schema unless the name is qualified.
        assert_eq!(Spi::get_one::<bool>("SELECT to_regclass('cb_c') IS NULL").unwrap(), Some(true));
        Spi::run("CREATE SCHEMA cb_other").unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT nvembed_create_chunk_vectorizer('cb_docs', 'body', 'cb_other.\"Chunks\"')::text").unwrap(),
            Some("cb_other.\"Chunks\"".into())
        );
    }
}
