//! SQL-level tests of search (`sql/search.sql`): the one-call search against exact search, with
//! and without its index, filters, the hnsw settings it leaves as they were, partitions, and the
//! errors of bad columns and arguments. The fixture's vectors have 32 dimensions.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::sql_tests::tests::{assert_error, use_fixture};

    /// `name` (id, lang, body, e vector(32)) with `rows` embedded passages in three languages'
    /// worth of topics, analyzed; no row without a vector when `every` is not 0, every `every`-th
    /// row without one otherwise. Written by INSERT alone: an index created in the transaction
    /// that updated its rows is not used until that transaction ends (broken HOT chains).
    fn embedded_table(name: &str, rows: i32, every: i32) {
        Spi::run("CREATE EXTENSION IF NOT EXISTS vector").unwrap();
        Spi::run(&format!("CREATE TABLE {name} (id int PRIMARY KEY, lang text, body text, e vector(32))")).unwrap();
        Spi::run(&format!(
            "INSERT INTO {name} (id, lang, body, e)
             SELECT i, lang, body, CASE WHEN {every} = 0 OR i % {every} <> 0 THEN nvembed_passage(body)::vector END
             FROM (SELECT i, (ARRAY['en', 'fr', 'de'])[i % 3 + 1] AS lang,
                          format('passage %s: %s, %s', i, (ARRAY['boats in the harbour', 'tax law', 'protein folding', 'jazz piano',
                                                                  'volcanoes', 'sourdough bread', 'railway signalling'])[i % 7 + 1],
                                 repeat('and more ', i % 5)) AS body
                   FROM generate_series(1, {rows}) i) rows"
        ))
        .unwrap();
        Spi::run(&format!("ANALYZE {name}")).unwrap();
    }

    /// The ids of `nvembed_search(call...)`, in its order.
    fn searched(call: &str) -> Vec<i32> {
        Spi::get_one::<Vec<i32>>(&format!("SELECT array_agg((s.item).id ORDER BY s.ord) FROM {call} WITH ORDINALITY s(item, score, ord)"))
            .unwrap()
            .unwrap_or_default()
    }

    /// The ids of exact search of `table` for query text `query`, best first.
    fn exact(table: &str, query: &str, filter: &str, k: i64) -> Vec<i32> {
        Spi::get_one::<Vec<i32>>(&format!(
            "SELECT array_agg(id ORDER BY d, id) FROM (
                 SELECT id, e <#> nvembed_query({q})::vector AS d FROM {table}
                 WHERE e IS NOT NULL AND ({filter}) ORDER BY d, id LIMIT {k}) x",
            q = pgrx::spi::quote_literal(query)
        ))
        .unwrap()
        .unwrap_or_default()
    }

    fn index_scans(index: &str) -> i64 {
        Spi::get_one::<i64>(&format!("SELECT pg_stat_get_xact_numscans('{index}'::regclass)")).unwrap().unwrap()
    }

    #[pg_test]
    fn search_through_its_index_equals_exact_search_when_every_row_is_a_candidate() {
        use_fixture();
        embedded_table("sdocs", 300, 0);
        let index = Spi::get_one::<String>("SELECT nvembed_create_search_index('sdocs')::text").unwrap().unwrap();
        // By default the signs of the vectors themselves (no centre).
        let plain = Spi::get_one::<String>(
            "SELECT s.index || ' ' || s.expression || ' ' || (s.centre IS NULL) FROM nvembed_search_index('sdocs', 'e', 32) s",
        )
        .unwrap()
        .unwrap();
        assert_eq!(plain, format!("{index} (public.binary_quantize(e))::bit(32) true"));
        // A table this small is read sequentially unless the planner is told not to.
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        Spi::run("SET LOCAL hnsw.ef_search = 77").unwrap();
        Spi::run("SET LOCAL hnsw.iterative_scan = strict_order").unwrap();
        let before = index_scans(&index);
        for query in ["sailing boats", "bread recipes", "a question about trains"] {
            let q = pgrx::spi::quote_literal(query);
            assert_eq!(
                searched(&format!("nvembed_search(NULL::sdocs, {q}, 10, candidates => 300)")),
                exact("sdocs", query, "true", 10),
                "{query}"
            );
            // k at least the table: every row, in exact order.
            assert_eq!(searched(&format!("nvembed_search(NULL::sdocs, {q}, 500)")), exact("sdocs", query, "true", 500));
            // The filter is applied before the limit.
            assert_eq!(
                searched(&format!("nvembed_search(NULL::sdocs, {q}, 5, 'lang = ''fr''', candidates => 300)")),
                exact("sdocs", query, "lang = 'fr'", 5)
            );
            // A filter only one row passes: that row (the exact scan answers when the index's
            // candidates are fewer than k).
            assert_eq!(searched(&format!("nvembed_search(NULL::sdocs, {q}, 5, 'id = 123')")), vec![123]);
        }
        assert!(index_scans(&index) >= before + 9, "the search did not use {index}");
        // The rows come back whole, with their inner product as the score; a text query is the
        // query vector of nvembed_query.
        let whole = Spi::get_one::<bool>(
            "SELECT bool_and((s.item).body = d.body AND abs(s.score + (d.e <#> nvembed_query('jazz')::vector)) < 1e-6)
                    AND count(*) = 10
             FROM nvembed_search(NULL::sdocs, 'jazz') s JOIN sdocs d ON d.id = (s.item).id",
        )
        .unwrap()
        .unwrap();
        assert!(whole);
        assert_eq!(
            searched("nvembed_search(NULL::sdocs, nvembed_query('jazz'), 10)"),
            searched("nvembed_search(NULL::sdocs, 'jazz', 10)")
        );
        assert_eq!(
            searched("nvembed_search(NULL::sdocs, nvembed_query('jazz')::vector, 10)"),
            searched("nvembed_search(NULL::sdocs, 'jazz', 10)")
        );
        // The caller's hnsw settings are the caller's again.
        let settings = Spi::get_one::<String>("SELECT current_setting('hnsw.ef_search') || ' ' || current_setting('hnsw.iterative_scan')")
            .unwrap()
            .unwrap();
        assert_eq!(settings, "77 strict_order");
        // NULL query: no rows.
        assert_eq!(searched("nvembed_search(NULL::sdocs, NULL::text)"), Vec::<i32>::new());
    }

    #[pg_test]
    fn search_without_an_index_or_after_it_is_dropped_is_exact() {
        use_fixture();
        embedded_table("plain", 120, 10);
        assert_eq!(searched("nvembed_search(NULL::plain, 'volcanoes', 7)"), exact("plain", "volcanoes", "true", 7));
        // Rows without a vector are never returned, whatever k.
        assert_eq!(searched("nvembed_search(NULL::plain, 'volcanoes', 1000)").len(), 108);
        let index = Spi::get_one::<String>("SELECT nvembed_create_search_index('plain')::text").unwrap().unwrap();
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        let before = index_scans(&index);
        assert_eq!(
            searched("nvembed_search(NULL::plain, 'volcanoes', 7, candidates => 120)"),
            exact("plain", "volcanoes", "true", 7)
        );
        assert_eq!(index_scans(&index), before + 1);
        Spi::run(&format!("DROP INDEX {index}")).unwrap();
        assert_eq!(searched("nvembed_search(NULL::plain, 'volcanoes', 7)"), exact("plain", "volcanoes", "true", 7));
        // An index made by hand without a centre (the README's earlier recipe) is used too.
        Spi::run("CREATE INDEX by_hand ON plain USING hnsw ((binary_quantize(e)::bit(32)) bit_hamming_ops)").unwrap();
        let before = index_scans("by_hand");
        assert_eq!(
            searched("nvembed_search(NULL::plain, 'volcanoes', 7, candidates => 120)"),
            exact("plain", "volcanoes", "true", 7)
        );
        assert_eq!(index_scans("by_hand"), before + 1);
        // ...and counts as the column's search index.
        assert_error("SELECT nvembed_create_search_index('plain')", "42710", "already has a search index, public.by_hand");
        // With the index there but not scanned (the candidates then come from a sort by Hamming
        // distance), rows without a vector still never come back, whatever k.
        Spi::run("SET LOCAL enable_indexscan = off").unwrap();
        assert_eq!(searched("nvembed_search(NULL::plain, 'volcanoes', 1000)").len(), 108);
        assert_eq!(
            searched("nvembed_search(NULL::plain, 'volcanoes', 7, candidates => 120)"),
            exact("plain", "volcanoes", "true", 7)
        );
        // A k far past any table is no arithmetic error.
        assert_eq!(searched("nvembed_search(NULL::plain, 'volcanoes', 2000000000)").len(), 108);
    }

    #[pg_test]
    fn odd_names_are_quoted_and_centres_never_collide() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS vector").unwrap();
        // A table whose name has a space, a column named like the statement's alias, a vector
        // column with a space, and a dropped column.
        Spi::run(
            r#"CREATE TABLE "My Docs" (id int PRIMARY KEY, gone int, t text, "odd col" vector(32));
               ALTER TABLE "My Docs" DROP COLUMN gone;
               INSERT INTO "My Docs" SELECT i, format('text %s of %s', i, i % 4), nvembed_passage(format('text %s of %s', i, i % 4))::vector
               FROM generate_series(1, 60) i;"#,
        )
        .unwrap();
        let index =
            Spi::get_one::<String>(r#"SELECT nvembed_create_search_index('"My Docs"', centred => true)::text"#).unwrap().unwrap();
        let centre = Spi::get_one::<String>(r#"SELECT s.centre FROM nvembed_search_index('"My Docs"', 'odd col', 32) s"#).unwrap().unwrap();
        assert_eq!(centre, r#"public."My Docs_odd col_centre"()"#);
        // The centre is the column's mean, an IMMUTABLE function beside the table.
        let mean = Spi::get_one::<bool>(
            r#"SELECT public."My Docs_odd col_centre"()::real[] = (SELECT avg("odd col") FROM "My Docs")::real[]
                      AND (SELECT p.provolatile = 'i' FROM pg_proc p WHERE p.oid = 'public."My Docs_odd col_centre"'::regproc)"#,
        )
        .unwrap()
        .unwrap();
        assert!(mean);
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        let scans = || Spi::get_one::<i64>(&format!("SELECT pg_stat_get_xact_numscans('{}'::regclass)", index.replace('\'', "''"))).unwrap().unwrap();
        let before = scans();
        let same = Spi::get_one::<bool>(
            r#"SELECT array_agg((s.item).id ORDER BY s.score DESC) = (SELECT array_agg(id) FROM (SELECT id FROM "My Docs" ORDER BY "odd col" <#> nvembed_query('text 3')::vector LIMIT 5) x)
                      AND bool_and((s.item).t = d.t)
               FROM nvembed_search(NULL::"My Docs", 'text 3', 5, candidates => 60) s JOIN "My Docs" d ON d.id = (s.item).id"#,
        )
        .unwrap()
        .unwrap();
        assert!(same, "the search of \"My Docs\" differs from exact search");
        assert_eq!(scans(), before + 1);
        // Table a_b's column c and table a's column b_c would both be a_b_c_centre.
        Spi::run(
            "CREATE TABLE a_b (c vector(32)); CREATE TABLE a (b_c vector(32));
             INSERT INTO a_b SELECT nvembed_passage('one ' || i)::vector FROM generate_series(1, 20) i;
             INSERT INTO a SELECT nvembed_passage('two ' || i)::vector FROM generate_series(1, 20) i;
             SELECT nvembed_create_search_index('a_b', centred => true); SELECT nvembed_create_search_index('a', centred => true);",
        )
        .unwrap();
        let centres = Spi::get_one::<String>(
            "SELECT (SELECT s.centre FROM nvembed_search_index('a_b', 'c', 32) s) || ' ' || (SELECT s.centre FROM nvembed_search_index('a', 'b_c', 32) s)
                    || ' ' || (public.a_b_c_centre()::real[] = (SELECT avg(c) FROM a_b)::real[])
                    || ' ' || (public.a_b_c_centre_2()::real[] = (SELECT avg(b_c) FROM a)::real[])",
        )
        .unwrap()
        .unwrap();
        assert_eq!(centres, "public.a_b_c_centre() public.a_b_c_centre_2() true true");
        // Tables named like the statements' parts, a filter that names its table, reads another
        // table and ends in a comment, and a temporary table's centred index.
        Spi::run(
            "CREATE TABLE candidate (id int PRIMARY KEY, lang text, e vector(32)); CREATE TABLE best (id int);
             INSERT INTO candidate SELECT i, (ARRAY['en', 'fr'])[i % 2 + 1], nvembed_passage('candidate ' || i)::vector FROM generate_series(1, 40) i;
             INSERT INTO best SELECT i FROM generate_series(1, 20) i;
             SELECT nvembed_create_search_index('candidate');
             CREATE TEMP TABLE scratch AS SELECT * FROM candidate;
             SELECT nvembed_create_search_index('scratch', centred => true);",
        )
        .unwrap();
        let filtered = Spi::get_one::<bool>(
            "SELECT array_agg((h.item).id ORDER BY h.score DESC) =
                    (SELECT array_agg(id) FROM (SELECT id FROM candidate WHERE lang = 'fr' AND id IN (SELECT id FROM best)
                                                ORDER BY e <#> nvembed_query('candidate 7')::vector LIMIT 4) x)
             FROM nvembed_search(NULL::candidate, 'candidate 7', 4, 'candidate.lang = ''fr'' AND id IN (SELECT id FROM best) -- French only') h",
        )
        .unwrap()
        .unwrap();
        assert!(filtered, "a filter naming its table, reading another and ending in a comment");
        // A filter that would escape its parentheses stays one condition: k rows at most.
        assert_eq!(searched("nvembed_search(NULL::candidate, 'candidate 7', 3, 'true) OR (true')").len(), 3);
        let temp = Spi::get_one::<String>("SELECT s.centre FROM nvembed_search_index('scratch', 'e', 32) s").unwrap().unwrap();
        assert_eq!(temp, "pg_temp.scratch_e_centre()");
        assert_error("SELECT nvembed_create_search_index(NULL)", "22004", "the table must not be NULL");
        // PostgreSQL builds no index of a partitioned table concurrently: said before anything is made.
        Spi::run("CREATE TABLE p (e vector(32)) PARTITION BY LIST ((e IS NULL)); CREATE TABLE p1 PARTITION OF p DEFAULT;").unwrap();
        assert_error(
            "SELECT nvembed_search_index_statement('p', build_concurrently => true)",
            "0A000",
            "PostgreSQL cannot build an index of a partitioned table concurrently",
        );
    }

    #[pg_test]
    fn search_of_a_partitioned_table_covers_every_partition() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS vector").unwrap();
        Spi::run(
            "CREATE TABLE parted (id int, lang text, body text, e vector(32)) PARTITION BY LIST (lang);
             CREATE TABLE parted_en PARTITION OF parted FOR VALUES IN ('en');
             CREATE TABLE parted_other PARTITION OF parted DEFAULT;
             INSERT INTO parted SELECT i, lang, body, nvembed_passage(body)::vector
             FROM (SELECT i, (ARRAY['en', 'fr'])[i % 2 + 1] AS lang, format('text number %s about %s', i, i % 9) AS body
                   FROM generate_series(1, 90) i) rows;",
        )
        .unwrap();
        Spi::run("SELECT nvembed_create_search_index('parted')").unwrap();
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        let got = searched("nvembed_search(NULL::parted, 'number 7', 6, candidates => 90)");
        assert_eq!(got, exact("parted", "number 7", "true", 6));
        assert_eq!(
            searched("nvembed_search(NULL::parted, 'number 7', 4, 'lang = ''fr''', candidates => 90)"),
            exact("parted", "number 7", "lang = 'fr'", 4)
        );
        // Rows written after the index are indexed (and found) as they are written.
        Spi::run("INSERT INTO parted VALUES (1000, 'en', 'number 7 number 7', nvembed_passage('number 7 number 7')::vector)").unwrap();
        assert_eq!(
            searched("nvembed_search(NULL::parted, 'number 7', 6, candidates => 91)"),
            exact("parted", "number 7", "true", 6)
        );
    }

    #[pg_test]
    fn bad_columns_and_arguments_are_refused_with_their_sqlstate() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS vector").unwrap();
        Spi::run(
            "CREATE TABLE odd (id int PRIMARY KEY, arr real[], free vector, short vector(16), e vector(32), h halfvec(32));
             CREATE VIEW odd_view AS SELECT * FROM odd;
             CREATE TABLE empty (id int, e vector(32));",
        )
        .unwrap();
        // Prove the model's dimension is known (a model is loaded) before the checks that need it.
        Spi::run("SELECT nvembed_passage('load')").unwrap();
        assert_error("SELECT nvembed_create_search_index('odd', 'arr')", "42804", "column arr of public.odd has type real[], not vector(n)");
        assert_error("SELECT nvembed_create_search_index('odd', 'free')", "42804", "column free of public.odd has no fixed dimension");
        assert_error(
            "SELECT nvembed_create_search_index('odd', 'short')",
            "42804",
            "column short of public.odd has 16 dimensions, but the model's vectors have 32",
        );
        assert_error("SELECT nvembed_create_search_index('odd', 'nope')", "42703", "column nope of relation public.odd does not exist");
        assert_error("SELECT nvembed_create_search_index('odd')", "42702", "public.odd has 4 vector columns (free, short, e, h)");
        assert_error("SELECT nvembed_create_search_index('odd_view', 'e')", "42809", "public.odd_view is not a table");
        assert_error(
            "SELECT nvembed_create_search_index('empty', centred => true)",
            "55000",
            "column e of public.empty has no vectors yet to centre an index on",
        );
        assert_error("SELECT * FROM nvembed_search(1, 'boats')", "42809", "source must be a row of the table to search, not a value of type integer");
        // Without a centre the index needs no rows: made on the empty table, it holds the rows
        // written later.
        Spi::run("SELECT nvembed_create_search_index('empty'); INSERT INTO empty VALUES (1, nvembed_passage('boats')::vector)").unwrap();
        assert_eq!(searched("nvembed_search(NULL::empty, 'boats')"), vec![1]);
        assert_error("SELECT * FROM nvembed_search(NULL::empty, 'boats', 0)", "22023", "k must be at least 1, not 0");
        assert_error(
            "SELECT * FROM nvembed_search(NULL::empty, 'boats', 50, candidates => 20)",
            "22023",
            "candidates (20) must be at least k (50)",
        );
        assert_error(
            "SELECT * FROM nvembed_search(NULL::empty, array_fill(0.1::real, ARRAY[8]))",
            "22000",
            "the query vector has 8 dimensions, column e of empty has 32",
        );
        assert_error("SELECT * FROM nvembed_search(NULL::odd, 'boats', column_name => 'arr')", "42804", "not vector(n) or halfvec(n)");
        // halfvec columns are indexed and searched as well.
        Spi::run("INSERT INTO odd (id, h) SELECT i, nvembed_passage(format('halfvec row %s', i))::halfvec FROM generate_series(1, 40) i").unwrap();
        Spi::run("SELECT nvembed_create_search_index('odd', 'h')").unwrap();
        let same = Spi::get_one::<bool>(
            "SELECT array_agg((s.item).id ORDER BY s.score DESC) =
                    (SELECT array_agg(id ORDER BY h <#> nvembed_query('row 3')::halfvec) FROM (SELECT id, h FROM odd ORDER BY h <#> nvembed_query('row 3')::halfvec LIMIT 5) x)
             FROM nvembed_search(NULL::odd, 'row 3', 5, column_name => 'h', candidates => 40) s",
        )
        .unwrap()
        .unwrap();
        assert!(same);
    }
}
