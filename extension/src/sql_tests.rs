//! SQL-level tests on a real PostgreSQL 15 with pgvector, the tiny fixture as the model.
//! `make test` prepares NVEMBED_TEST_FIXTURE: a copy of the fixture readable by the server's OS
//! user, with `expected_*.jsonl` written by the engine's own CLI for the same texts.

use pgrx::prelude::*;

#[pg_schema]
pub(crate) mod tests {
    use pgrx::prelude::*;

    const FIXTURE: &str = match option_env!("NVEMBED_TEST_FIXTURE") {
        Some(dir) => dir,
        None => "/tmp/nvembed-test-fixture",
    };

    fn model_dir() -> String {
        format!("{FIXTURE}/nvembed-tiny-a")
    }

    /// Tests run concurrently against one model server. Tests that kill it, load other models
    /// or read its global status take this lock exclusively; the others share it.
    const MODEL_SERVER_LOCK: i64 = 0x6e76_656d;

    pub(crate) fn use_fixture() {
        Spi::run(&format!("SELECT pg_advisory_xact_lock_shared({MODEL_SERVER_LOCK})")).unwrap();
        serve_fixture_if_another_test_failed();
    }

    pub(crate) fn use_fixture_exclusively() {
        Spi::run(&format!("SELECT pg_advisory_xact_lock({MODEL_SERVER_LOCK})")).unwrap();
        serve_fixture_if_another_test_failed();
    }

    /// Tests that serve another model put the fixture back when they pass; one that failed
    /// half-way must not make the others fail too.
    fn serve_fixture_if_another_test_failed() {
        // The configuration files, not the status: the server may be restarting just now.
        let configured = Spi::get_one::<String>(
            "SELECT setting FROM pg_file_settings WHERE name = 'nvembed.model' AND applied ORDER BY seqno DESC LIMIT 1",
        )
        .unwrap();
        if configured.as_deref() != Some(model_dir().as_str()) {
            serve_model(&model_dir());
        }
        // The last line that sets it, applied or not: while another session rewrites
        // postgresql.auto.conf, pg_file_settings was seen to mark none of them applied.
        let dtype = Spi::get_one::<String>(
            "SELECT setting FROM pg_file_settings WHERE name = 'nvembed.dtype' ORDER BY seqno DESC LIMIT 1",
        )
        .ok()
        .flatten();
        if dtype.as_deref().is_some_and(|dtype| dtype != TEST_DTYPE) {
            serve_dtype(TEST_DTYPE);
        }
    }

    /// The dtype of the test configuration (`postgresql_conf_options`): the goldens are f32.
    const TEST_DTYPE: &str = "f32";

    /// Makes the model server load the model in `dtype` (ALTER SYSTEM and a reload), and waits
    /// until the restarted server reports that setting.
    fn serve_dtype(dtype: &str) {
        alter_system(&format!("ALTER SYSTEM SET nvembed.dtype = {}", pgrx::spi::quote_literal(dtype)));
        let started = std::time::Instant::now();
        loop {
            let now = Spi::get_one::<String>("SELECT dtype FROM nvembed_status()").unwrap();
            if now.as_deref() == Some(dtype) {
                return;
            }
            assert!(started.elapsed().as_secs() < 30, "the model server did not take dtype {dtype} (last: {now:?})");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Makes the model server serve `dir`, as an administrator does: ALTER SYSTEM (through
    /// dblink: it cannot run inside this test's transaction) and a reload; then waits until the
    /// restarted server reports it. `model_dir()` restores the test configuration.
    fn serve_model(dir: &str) {
        // (The test configuration itself is in postgresql.auto.conf, which ALTER SYSTEM rewrites.)
        alter_system(&format!("ALTER SYSTEM SET nvembed.model = {}", pgrx::spi::quote_literal(dir)));
        wait_for_server(|model| model.as_deref() == Some(dir));
    }

    /// Runs ALTER SYSTEM in its own session and reloads the configuration.
    pub(crate) fn alter_system(statement: &str) {
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        Spi::run_with_args("SELECT dblink_exec($1, $2)", &[self_connection().into(), statement.into()]).unwrap();
        Spi::run("SELECT pg_reload_conf()").unwrap();
    }

    /// Polls nvembed_status() (its `model` column, None while no server runs) until `ready`
    /// says so; fails the test after 30 s.
    fn wait_for_server(ready: impl Fn(Option<String>) -> bool) {
        let started = std::time::Instant::now();
        loop {
            let model = Spi::get_one::<String>("SELECT model FROM nvembed_status()").unwrap();
            if ready(model.clone()) {
                return;
            }
            assert!(started.elapsed().as_secs() < 30, "the model server did not come up as expected (last: {model:?})");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A fresh copy of the fixture at `{FIXTURE}/{name}`, for tests that break or alter one.
    fn fixture_copy(name: &str) -> String {
        let dir = format!("{FIXTURE}/{name}");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(model_dir()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), format!("{dir}/{}", entry.file_name().to_string_lossy())).unwrap();
        }
        dir
    }

    fn expected(kind: &str) -> Vec<Vec<f32>> {
        let text = std::fs::read_to_string(format!("{FIXTURE}/expected_{kind}.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn texts() -> Vec<String> {
        let text = std::fs::read_to_string(format!("{FIXTURE}/texts.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// A `real[]` in its text form.
    fn parse_vector(text: &str) -> Vec<f32> {
        text.trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect()
    }

    fn embed_sql(call: &str, text: &str) -> Vec<f32> {
        Spi::get_one_with_args::<Vec<f32>>(&format!("SELECT {call}"), &[text.into()])
            .unwrap()
            .unwrap()
    }

    /// Runs `statement` and asserts it fails with `sqlstate` and a message containing `needle`.
    pub(crate) fn assert_error(statement: &str, sqlstate: &str, needle: &str) {
        let check = format!(
            "DO $t$ BEGIN {statement}; RAISE EXCEPTION 'no error raised' USING ERRCODE = 'P0004';
             EXCEPTION WHEN OTHERS OR query_canceled THEN
               IF SQLSTATE <> '{sqlstate}' OR position({} in SQLERRM) = 0 THEN
                 RAISE EXCEPTION 'got % %', SQLSTATE, SQLERRM;
               END IF;
             END $t$",
            pgrx::spi::quote_literal(needle)
        );
        Spi::run(&check).unwrap();
    }

    #[pg_test]
    fn values_equal_the_engine_for_query_passage_and_task() {
        use_fixture();
        let texts = texts();
        for (kind, call) in [
            ("query", "nvembed_query($1)"),
            ("passage", "nvembed_passage($1)"),
            ("task", "nvembed_query($1, 'Given a claim, find documents that refute it')"),
        ] {
            for (text, want) in texts.iter().zip(expected(kind)) {
                let got = embed_sql(call, text);
                assert!(max_abs_diff(&got, &want) <= 1e-6, "{kind} {text:?}");
            }
        }
        let norm = Spi::get_one::<f64>("SELECT sqrt(sum(x * x)) FROM unnest(nvembed_passage('hello')) x")
            .unwrap()
            .unwrap();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    /// `nvembed.dtype = 'int8'`: the model server quantizes the weights at load and says so in
    /// nvembed_status(); every vector keeps a cosine of at least 0.995 with the f32 engine's (itself
    /// within 1e-5 of the reference's goldens), and int8 really ran: the vectors are not f32's.
    #[pg_test]
    fn int8_weights_serve_vectors_close_to_f32() {
        use_fixture_exclusively();
        serve_dtype("int8");
        let cosine = |a: &[f32], b: &[f32]| {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            dot / (norm(a) * norm(b))
        };
        let mut worst: f64 = 1.0;
        let mut largest_diff: f32 = 0.0;
        for (kind, call) in [("query", "nvembed_query($1)"), ("passage", "nvembed_passage($1)")] {
            for (text, want) in texts().iter().zip(expected(kind)) {
                let got = embed_sql(call, text);
                let c = cosine(&got, &want);
                assert!(c >= 0.995, "{kind} {text:?}: cosine {c}");
                worst = worst.min(c);
                largest_diff = largest_diff.max(max_abs_diff(&got, &want));
            }
        }
        let (loaded, dtype) = Spi::get_two::<bool, String>("SELECT loaded, dtype FROM nvembed_status()").unwrap();
        // Announced with the activations' dtype, which depends on the CPU.
        assert_eq!(loaded, Some(true));
        assert!(["int8-bf16", "int8-f32"].contains(&dtype.as_deref().unwrap_or("")), "{dtype:?}");
        assert!(largest_diff > 1e-4, "int8 vectors equal f32's within {largest_diff}: not quantized");
        pgrx::notice!("int8 in SQL: worst cosine {worst:.6} against f32");
        serve_dtype(TEST_DTYPE);
    }

    #[pg_test]
    fn trigger_fills_vector_halfvec_and_array_columns() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS vector").unwrap();
        Spi::run(
            "CREATE TABLE docs (id int PRIMARY KEY, body text, note text,
                                embedding vector(32), half halfvec(32), arr real[]);
             CREATE TRIGGER e1 BEFORE INSERT OR UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'embedding');
             CREATE TRIGGER e2 BEFORE INSERT OR UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'half');
             CREATE TRIGGER e3 BEFORE INSERT OR UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'arr', 'query');
             INSERT INTO docs (id, body) VALUES (1, 'hello'), (2, 'Crème brûlée à Paris'), (3, NULL);",
        )
        .unwrap();
        let check = |id: i32, body: &str| {
            let got = Spi::get_one::<Vec<f32>>(&format!("SELECT embedding::real[] FROM docs WHERE id = {id}"))
                .unwrap()
                .unwrap();
            // Equal up to float rounding: concurrent tests' calls may share a padded batch.
            assert!(max_abs_diff(&got, &embed_sql("nvembed_passage($1)", body)) <= 1e-6);
            let half = Spi::get_one::<Vec<f32>>(&format!("SELECT half::vector::real[] FROM docs WHERE id = {id}"))
                .unwrap()
                .unwrap();
            assert!(max_abs_diff(&half, &got) <= 1e-3);
            let arr = Spi::get_one::<Vec<f32>>(&format!("SELECT arr FROM docs WHERE id = {id}"))
                .unwrap()
                .unwrap();
            assert!(max_abs_diff(&arr, &embed_sql("nvembed_query($1)", body)) <= 1e-6);
        };
        check(1, "hello");
        check(2, "Crème brûlée à Paris");
        let nulls =
            Spi::get_one::<bool>("SELECT embedding IS NULL AND half IS NULL AND arr IS NULL FROM docs WHERE id = 3")
                .unwrap();
        assert_eq!(nulls, Some(true));
        // UPDATE of the text re-embeds; UPDATE of another column does not.
        Spi::run("UPDATE docs SET body = 'goodbye' WHERE id = 1").unwrap();
        check(1, "goodbye");
        Spi::run("UPDATE docs SET embedding = array_fill(0.5, ARRAY[32])::vector WHERE id = 2").unwrap();
        Spi::run("UPDATE docs SET note = 'edited' WHERE id = 2").unwrap();
        let kept = Spi::get_one::<bool>("SELECT embedding = array_fill(0.5, ARRAY[32])::vector FROM docs WHERE id = 2")
            .unwrap();
        assert_eq!(kept, Some(true), "an update of another column must not re-embed");
        Spi::run("UPDATE docs SET body = NULL WHERE id = 1").unwrap();
        let cleared = Spi::get_one::<bool>("SELECT embedding IS NULL FROM docs WHERE id = 1").unwrap();
        assert_eq!(cleared, Some(true));
        // Assignment casts: arrays go straight into vector / halfvec columns.
        Spi::run(
            "INSERT INTO docs (id, note, embedding, half) VALUES (9, 'x', nvembed_passage('x'), nvembed_passage('x'))",
        )
        .unwrap();
        // A wrong column name is a clear error at first use.
        Spi::run("CREATE TABLE bad (body text, e vector(32));
                  CREATE TRIGGER b BEFORE INSERT ON bad FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'embeding')")
            .unwrap();
        assert_error("INSERT INTO bad (body) VALUES ('x')", "42703", "embeding");
    }

    #[pg_test]
    fn trigger_keeps_given_vectors_and_fills_missing_ones_in_every_partition() {
        use_fixture();
        // A partitioned parent whose second partition has another column order; the trigger is
        // defined once, on the parent. Short float output in the session must not reach the
        // stored vectors.
        Spi::run(
            "SET extra_float_digits = -4;
             CREATE TABLE tr (id int, body text, note text, embedding real[], attachment text) PARTITION BY RANGE (id);
             CREATE TABLE tr_low PARTITION OF tr FOR VALUES FROM (0) TO (100);
             CREATE TABLE tr_high (embedding real[], attachment text, note text, body text, id int);
             ALTER TABLE tr ATTACH PARTITION tr_high FOR VALUES FROM (100) TO (MAXVALUE);
             ALTER TABLE tr ALTER COLUMN attachment SET STORAGE EXTERNAL;
             CREATE TRIGGER tr_embed BEFORE INSERT OR UPDATE ON tr FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'embedding');
             CREATE TEMP TABLE marker AS SELECT array_fill(0.25::real, ARRAY[32]) AS v, array_fill(-0.5::real, ARRAY[32]) AS w;",
        )
        .unwrap();
        let vector_of = |id: i32| -> Option<Vec<f32>> {
            Spi::get_one::<Vec<f32>>(&format!("SELECT embedding FROM tr WHERE id = {id}")).unwrap()
        };
        let is_passage_of = |id: i32, text: &str| {
            let got = vector_of(id).unwrap_or_else(|| panic!("row {id} has no vector"));
            assert!(
                max_abs_diff(&got, &embed_sql("nvembed_passage($1)", text)) <= 1e-6,
                "row {id}: not the vector of {text:?}"
            );
        };
        let is_marker = |id: i32, marker: &str| {
            let kept = Spi::get_one::<bool>(&format!(
                "SELECT embedding = (SELECT {marker} FROM marker) FROM tr WHERE id = {id}"
            ))
            .unwrap();
            assert_eq!(kept, Some(true), "row {id} should hold marker {marker}");
        };
        // INSERT: a NULL target is filled (in either partition), a given one kept, also by COPY.
        Spi::run("INSERT INTO tr (id, body) VALUES (1, 'alpha'), (101, 'gamma')").unwrap();
        Spi::run("INSERT INTO tr (id, body, embedding) SELECT 2, 'beta', v FROM marker").unwrap();
        let copied = format!("{FIXTURE}/trigger-copy.tsv");
        let marker_text = Spi::get_one::<String>("SELECT v::text FROM marker").unwrap().unwrap();
        std::fs::write(&copied, format!("3\tdelta\t{marker_text}\n4\tepsilon\t\\N\n")).unwrap();
        Spi::run(&format!("COPY tr (id, body, embedding) FROM '{copied}'")).unwrap();
        is_passage_of(1, "alpha");
        is_passage_of(101, "gamma");
        is_marker(2, "v");
        is_marker(3, "v");
        is_passage_of(4, "epsilon");
        // UPDATE of the text re-embeds, unless the statement also set the target.
        Spi::run("UPDATE tr SET body = 'alpha, edited' WHERE id = 1").unwrap();
        is_passage_of(1, "alpha, edited");
        Spi::run("UPDATE tr SET body = 'beta, edited', embedding = (SELECT w FROM marker) WHERE id = 2").unwrap();
        is_marker(2, "w");
        // Writing back the old vector (as ORMs do) or NULL with a new text re-embeds.
        Spi::run("UPDATE tr SET body = 'beta, again', embedding = embedding WHERE id = 2").unwrap();
        is_passage_of(2, "beta, again");
        Spi::run("UPDATE tr SET body = 'beta, cleared', embedding = NULL WHERE id = 2").unwrap();
        is_passage_of(2, "beta, cleared");
        // Text unchanged: a set target is kept (no model call), a NULL one is filled.
        Spi::run("UPDATE tr SET embedding = (SELECT v FROM marker) WHERE id = 101").unwrap();
        Spi::run("UPDATE tr SET note = 'touched' WHERE id = 101").unwrap();
        is_marker(101, "v");
        // ... and its unchanged out-of-line values are not stored again.
        Spi::run("UPDATE tr SET attachment = repeat('x', 100000) WHERE id = 101").unwrap();
        let toast_rows_written = || {
            Spi::get_one::<i64>(
                "SELECT pg_stat_get_xact_tuples_inserted(reltoastrelid) FROM pg_class WHERE relname = 'tr_high'",
            )
            .unwrap()
            .unwrap()
        };
        let before = toast_rows_written();
        Spi::run("UPDATE tr SET note = 'touched again' WHERE id = 101").unwrap();
        assert_eq!(toast_rows_written(), before, "an update of another column stored the long value again");
        Spi::run("UPDATE tr SET embedding = NULL WHERE id = 101").unwrap();
        is_passage_of(101, "gamma");
        // NULL text → NULL vector; a row moved to another partition is embedded there.
        Spi::run("UPDATE tr SET body = NULL WHERE id = 4").unwrap();
        assert_eq!(vector_of(4), None);
        Spi::run("UPDATE tr SET id = 150, body = 'moved' WHERE id = 1").unwrap();
        is_passage_of(150, "moved");
        let partition = Spi::get_one::<String>("SELECT tableoid::regclass::text FROM tr WHERE id = 150").unwrap();
        assert_eq!(partition.as_deref(), Some("tr_high"));
        std::fs::remove_file(&copied).unwrap();
    }

    #[pg_test]
    fn inner_product_search_returns_the_true_top_k() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS vector").unwrap();
        Spi::run("CREATE TABLE corpus (id int, body text, embedding vector(32))").unwrap();
        let texts = texts();
        for (i, t) in texts.iter().enumerate() {
            Spi::run_with_args(
                "INSERT INTO corpus VALUES ($1, $2, nvembed_passage($2)::vector)",
                &[(i as i32).into(), t.as_str().into()],
            )
            .unwrap();
        }
        let query = "how to become a radiology technician in michigan?";
        let q = embed_sql("nvembed_query($1)", query);
        let mut brute: Vec<(f32, i32)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let p = embed_sql("nvembed_passage($1)", t);
                (q.iter().zip(&p).map(|(a, b)| a * b).sum::<f32>(), i as i32)
            })
            .collect();
        brute.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        let want: Vec<i32> = brute.iter().take(3).map(|x| x.1).collect();
        let got = Spi::get_one_with_args::<Vec<i32>>(
            "SELECT array_agg(id) FROM (SELECT id FROM corpus ORDER BY embedding <#> nvembed_query($1)::vector LIMIT 3) s",
            &[query.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got, want);
    }

    #[pg_test]
    fn model_errors_name_the_path_and_recover() {
        use_fixture_exclusively();
        serve_model("/nonexistent/nvembed-model");
        let status = "SELECT loaded::text || ' ' || coalesce(last_error, '-') FROM nvembed_status()";
        assert_eq!(Spi::get_one::<String>(status).unwrap().as_deref(), Some("false -"), "nothing tried yet");
        assert_error("PERFORM nvembed_passage('x')", "F0000", "/nonexistent/nvembed-model");
        // The status says why, until a model loads.
        let after = Spi::get_one::<String>(status).unwrap().unwrap_or_default();
        assert!(after.starts_with("false ") && after.contains("/nonexistent/nvembed-model"), "{after}");
        // A corrupt shard.
        let broken = fixture_copy("broken");
        let shard = format!("{broken}/model-00001-of-00002.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() / 3]).unwrap();
        serve_model(&broken);
        assert_error("PERFORM nvembed_passage('x')", "F0000", "model-00001-of-00002.safetensors");
        // Fixing the setting makes the next call work, and clears the status's error.
        serve_model(&model_dir());
        assert_eq!(embed_sql("nvembed_passage($1)", "x").len(), 32);
        assert_eq!(Spi::get_one::<String>(status).unwrap().as_deref(), Some("true -"));
        // Nothing to pool: an error, never NaN.
        Spi::run("SET nvembed.max_length = 10").unwrap();
        assert_error("PERFORM nvembed_query('x')", "22023", "nothing left to pool");
        assert_error("SET nvembed.max_length = 0", "22023", "max_length");
        assert_error("SET nvembed.max_length = 40000", "22023", "max_length");
    }

    #[pg_test]
    fn killing_the_model_process_mid_call_errors_and_the_next_call_works() {
        use_fixture_exclusively();
        let postmaster_started = Spi::get_one::<String>("SELECT pg_postmaster_start_time()::text").unwrap();
        embed_sql("nvembed_passage($1)", "warm up");
        let pid = Spi::get_one::<i32>("SELECT pid FROM nvembed_status()")
            .unwrap()
            .unwrap();
        let restarts_before = Spi::get_one::<i64>("SELECT restarts FROM nvembed_status()")
            .unwrap()
            .unwrap();
        let killer = kill_after(pid, 300);
        let long = "The lighthouse beam sweeps across the water in slow, steady circles. ".repeat(2000);
        assert_error(
            &format!("PERFORM nvembed_passage({})", pgrx::spi::quote_literal(&long)),
            "58000",
            "connection lost",
        );
        killer.join().unwrap();
        assert_eq!(embed_sql("nvembed_passage($1)", "after").len(), 32);
        let restarts_after = Spi::get_one::<i64>("SELECT restarts FROM nvembed_status()")
            .unwrap()
            .unwrap();
        assert!(restarts_after > restarts_before);
        // The postmaster did not crash-restart: same start time, and this session lives on.
        let still = Spi::get_one::<String>("SELECT pg_postmaster_start_time()::text").unwrap();
        assert_eq!(still, postmaster_started);
    }

    #[pg_test]
    fn status_reports_the_loaded_model() {
        use_fixture_exclusively();
        embed_sql("nvembed_passage($1)", "x");
        let (loaded, dim, model) =
            Spi::get_three::<bool, i32, String>("SELECT loaded, dimension, model FROM nvembed_status()").unwrap();
        assert_eq!((loaded, dim), (Some(true), Some(32)));
        assert_eq!(model, Some(model_dir()));
    }

    #[pg_test]
    fn plain_roles_cannot_change_the_model_settings() {
        Spi::run("CREATE ROLE nvembed_plain_user").unwrap();
        Spi::run("SET ROLE nvembed_plain_user").unwrap();
        let server_wide = [
            "nvembed.model = '/etc'",
            "nvembed.dtype = 'bf16'",
            "nvembed.device = 'cpu'",
            "nvembed.preload = on",
            "nvembed.threads = 1",
            "nvembed.max_length_limit = 100",
            "nvembed.max_request_tokens = 1000000",
        ];
        for setting in server_wide {
            assert_error(&format!("SET {setting}"), "55P02", "cannot be changed now");
        }
        Spi::run("SET nvembed.max_length = 100").unwrap();
        Spi::run("RESET ROLE").unwrap();
        // Not a superuser's session either, nor ALTER ROLE / DATABASE ... SET: one model server
        // serves every session, so no session may switch it for the others.
        for setting in server_wide {
            assert_error(&format!("SET {setting}"), "55P02", "cannot be changed now");
            assert_error(&format!("ALTER ROLE nvembed_plain_user SET {setting}"), "55P02", "cannot be changed now");
            let per_database = format!("ALTER DATABASE contrib_regression SET {setting}").replace('\'', "''");
            assert_error(
                &format!("EXECUTE replace('{per_database}', 'contrib_regression', quote_ident(current_database()))"),
                "55P02",
                "cannot be changed now",
            );
        }
        // postgresql.conf values are checked when they are set, and the error lists the valid ones.
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        for (setting, valid) in [
            ("nvembed.dtype = 'f64'", "auto, f32, f16, bf16, int8"),
            ("nvembed.device = 'tpu'", "cpu, cuda"),
        ] {
            let statement = format!("ALTER SYSTEM SET {setting}");
            Spi::run(&format!(
                "DO $t$ DECLARE d text; BEGIN
                   PERFORM dblink_exec({}, {});
                   RAISE EXCEPTION 'no error raised';
                 EXCEPTION WHEN invalid_parameter_value THEN
                   GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
                   IF d IS DISTINCT FROM {} THEN RAISE EXCEPTION 'detail: %', d; END IF;
                 END $t$",
                pgrx::spi::quote_literal(&self_connection()),
                pgrx::spi::quote_literal(&statement),
                pgrx::spi::quote_literal(&format!("Valid values are: {valid}.")),
            ))
            .unwrap();
        }
    }

    /// A connection string back to this test server, for dblink.
    pub(crate) fn self_connection() -> String {
        let socket_dir =
            Spi::get_one::<String>("SELECT split_part(current_setting('unix_socket_directories'), ',', 1)")
                .unwrap()
                .unwrap();
        let port = Spi::get_one::<String>("SELECT current_setting('port')")
            .unwrap()
            .unwrap();
        let db = Spi::get_one::<String>("SELECT current_database()::text")
            .unwrap()
            .unwrap();
        format!("host={} port={port} dbname={db} user=postgres", socket_dir.trim())
    }

    fn resident_anon_kb(pid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[pg_test]
    fn eight_concurrent_sessions_get_correct_vectors_and_stay_small() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        let conn = self_connection();
        let texts = texts();
        let want = expected("passage");
        let weight_kb: u64 = std::fs::read_dir(model_dir())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .map(|e| e.metadata().unwrap().len() / 1024)
            .sum();
        let sessions = 8;
        let mut pids = Vec::new();
        for s in 0..sessions {
            Spi::run_with_args("SELECT dblink_connect($1, $2)", &[format!("c{s}").into(), conn.clone().into()])
                .unwrap();
            let pid = Spi::get_one_with_args::<i32>(
                "SELECT pid FROM dblink($1, 'SELECT pg_backend_pid()') AS t(pid int)",
                &[format!("c{s}").into()],
            )
            .unwrap()
            .unwrap();
            pids.push(pid);
        }
        let before: Vec<u64> = pids.iter().map(|&p| resident_anon_kb(p)).collect();
        for round in 0..3 {
            // Every session sends its call before any result is read: they run concurrently.
            for s in 0..sessions {
                let text = &texts[(s + round) % texts.len()];
                let sql = format!("SELECT nvembed_passage({})::text", pgrx::spi::quote_literal(text));
                Spi::run_with_args("SELECT dblink_send_query($1, $2)", &[format!("c{s}").into(), sql.into()]).unwrap();
            }
            for s in 0..sessions {
                let got = Spi::get_one_with_args::<String>(
                    "SELECT v FROM dblink_get_result($1) AS t(v text)",
                    &[format!("c{s}").into()],
                )
                .unwrap()
                .unwrap();
                let got: Vec<f32> = got
                    .trim_matches(|c| c == '{' || c == '}')
                    .split(',')
                    .map(|x| x.parse().unwrap())
                    .collect();
                let expected = &want[(s + round) % texts.len()];
                assert!(max_abs_diff(&got, expected) <= 1e-6, "session {s} round {round}");
                // Drain the end-of-results marker of the async query.
                Spi::run_with_args("SELECT * FROM dblink_get_result($1) AS t(v text)", &[format!("c{s}").into()])
                    .unwrap();
            }
        }
        for (s, &pid) in pids.iter().enumerate() {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
            assert!(!maps.contains(".safetensors"), "backend {pid} mapped the weights");
            let grown = resident_anon_kb(pid).saturating_sub(before[s]);
            assert!(grown < weight_kb, "backend {pid} grew by {grown} kB (weights: {weight_kb} kB)");
            Spi::run_with_args("SELECT dblink_disconnect($1)", &[format!("c{s}").into()]).unwrap();
        }
    }

    /// Feeds the FIFO a config that fails to parse, so the model server's blocked load ends
    /// (whether or not the test got that far) and it serves the other tests again.
    struct UnblockOnDrop(String);

    impl Drop for UnblockOnDrop {
        fn drop(&mut self) {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let writer = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
            if let Ok(mut w) = writer {
                let _ = w.write_all(b"not json");
            }
        }
    }

    #[pg_test]
    fn statement_timeout_cancels_a_call_waiting_for_the_model_to_load() {
        use_fixture_exclusively();
        // A model whose config.json is a FIFO: loading blocks until someone writes to it.
        let slow = format!("{FIXTURE}/slow-load");
        let _ = std::fs::remove_dir_all(&slow);
        std::fs::create_dir_all(&slow).unwrap();
        let fifo = format!("{slow}/config.json");
        let fifo_c = std::ffi::CString::new(fifo.clone()).unwrap();
        // SAFETY: creating a FIFO at a path we own.
        assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
        let _unblock = UnblockOnDrop(fifo.clone());
        // statement_timeout arms at the start of a top-level statement: run the call as one, in
        // another session.
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        Spi::run_with_args("SELECT dblink_connect('slow', $1)", &[self_connection().into()]).unwrap();
        serve_model(&slow);
        Spi::run("SELECT dblink_exec('slow', 'SET statement_timeout = 300')").unwrap();
        let started = std::time::Instant::now();
        assert_error("PERFORM dblink_exec('slow', 'SELECT nvembed_passage(''x'')')", "57014", "statement timeout");
        let waited = started.elapsed();
        assert!(waited < std::time::Duration::from_millis(1500), "cancel took {waited:?}");
        Spi::run("SELECT dblink_disconnect('slow')").unwrap();
        drop(_unblock);
        serve_model(&model_dir());
        assert_eq!(embed_sql("nvembed_passage($1)", "after the timeout").len(), 32);
    }

    #[pg_test]
    fn batch_functions_keep_order_and_nulls() {
        use_fixture();
        let texts = texts();
        let want = expected("passage");
        let got = Spi::get_one_with_args::<Vec<Option<String>>>(
            "SELECT array_agg(e::text ORDER BY n) FROM nvembed_passages($1) WITH ORDINALITY AS t(e, n)",
            &[texts.clone().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.len(), texts.len());
        for (row, want) in got.iter().zip(&want) {
            assert!(max_abs_diff(&parse_vector(row.as_ref().unwrap()), want) <= 1e-6);
        }
        let nulls = Spi::get_one::<Vec<bool>>(
            "SELECT array_agg(e IS NULL ORDER BY n) FROM nvembed_queries(ARRAY['a', NULL, '', NULL]) WITH ORDINALITY AS t(e, n)",
        )
        .unwrap()
        .unwrap();
        assert_eq!(nulls, vec![false, true, false, true]);
        let same = Spi::get_one::<bool>(
            "SELECT e = nvembed_query('x', 'find claims') FROM nvembed_queries(ARRAY['x'], 'find claims') e",
        )
        .unwrap();
        assert_eq!(same, Some(true));
        let empty = Spi::get_one::<i64>("SELECT count(*) FROM nvembed_passages('{}'::text[])").unwrap();
        assert_eq!(empty, Some(0));
    }

    #[pg_test]
    fn backfill_embeds_every_missing_row_once_and_resumes() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        Spi::run_with_args("SELECT dblink_connect('bf', $1)", &[self_connection().into()]).unwrap();
        let setup = format!(
            "CREATE TABLE backfill_docs (id int PRIMARY KEY, body text, embedding real[]);
             INSERT INTO backfill_docs SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'passage number ' || g END, NULL
             FROM generate_series(1, 95) g;
             UPDATE backfill_docs SET embedding = '{{1}}' WHERE id = 3;"
        );
        Spi::run_with_args("SELECT dblink_exec('bf', $1)", &[setup.into()]).unwrap();
        let call = "CALL nvembed_backfill('backfill_docs', 'body', 'embedding', 'passage', 20)";
        Spi::run_with_args("SELECT dblink_exec('bf', $1)", &[call.into()]).unwrap();
        // Batched and single results agree to float rounding (padding changes the last bits).
        let check = "SELECT count(*) FILTER (WHERE embedding IS NULL AND body IS NOT NULL),
                            count(*) FILTER (WHERE embedding IS NOT NULL AND body IS NULL),
                            count(*) FILTER (WHERE (SELECT max(abs(x - y)) FROM unnest(embedding, nvembed_passage(body)) u(x, y)) <= 1e-6)
                     FROM backfill_docs";
        let counts = Spi::get_one_with_args::<String>(
            "SELECT m || ',' || n || ',' || k FROM dblink('bf', $1) AS t(m bigint, n bigint, k bigint)",
            &[check.into()],
        )
        .unwrap()
        .unwrap();
        // 86 non-NULL texts: row 3 was already embedded (and kept), 85 backfilled, all correct.
        assert_eq!(counts, "0,0,85");
        let kept = "SELECT (embedding = '{1}')::text FROM backfill_docs WHERE id = 3";
        let kept =
            Spi::get_one_with_args::<String>("SELECT v FROM dblink('bf', $1) AS t(v text)", &[kept.into()]).unwrap();
        assert_eq!(kept.as_deref(), Some("true"));
        // A re-run finds nothing to do; a wrong column is a clear error.
        Spi::run_with_args("SELECT dblink_exec('bf', $1)", &[call.into()]).unwrap();
        assert_error(
            "PERFORM dblink_exec('bf', 'CALL nvembed_backfill(''backfill_docs'', ''bodyy'', ''embedding'')')",
            "42703",
            "bodyy",
        );
        Spi::run("SELECT dblink_exec('bf', 'DROP TABLE backfill_docs')").unwrap();
        Spi::run("SELECT dblink_disconnect('bf')").unwrap();
    }

    /// Opens dblink session `name` to this server, using the fixture model. Statements sent
    /// there run in their own transactions: what they commit is what other sessions see.
    pub(crate) fn remote_session(name: &str) {
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        Spi::run_with_args("SELECT dblink_connect($1, $2)", &[name.into(), self_connection().into()]).unwrap();
    }

    pub(crate) fn remote_exec(name: &str, sql: &str) {
        Spi::run_with_args("SELECT dblink_exec($1, $2)", &[name.into(), sql.into()]).unwrap();
    }

    /// The one text value that `sql` returns in session `name`.
    pub(crate) fn remote_text(name: &str, sql: &str) -> String {
        Spi::get_one_with_args::<String>("SELECT v FROM dblink($1, $2) AS t(v text)", &[name.into(), sql.into()])
            .unwrap()
            .unwrap()
    }

    /// "rows with a text, of them rows holding their own text's passage vector (≤ 1e-6), rows
    /// holding a vector but no text" of `table` (a SQL name) with `source` and `target` columns,
    /// read in session `name`: this session never locks the tables the remote sessions drop.
    fn embedding_state(name: &str, table: &str, source: &str, target: &str) -> String {
        remote_text(
            name,
            &format!(
                "SELECT count({source}) || ',' ||
                        count(*) FILTER (WHERE (SELECT max(abs(x - y)) FROM unnest({target}::real[], nvembed_passage({source})) u(x, y)) <= 1e-6)
                        || ',' || count(*) FILTER (WHERE {target} IS NOT NULL AND {source} IS NULL)
                 FROM {table}"
            ),
        )
    }

    #[pg_test]
    fn backfill_matches_rows_in_partitions_children_and_quoted_tables() {
        use_fixture();
        remote_session("parts");
        // Three list partitions, one of them sub-partitioned, and a DEFAULT partition; no primary
        // key anywhere: every partition has rows at the same ctids. The quoted table's target is
        // a pgvector column (assignment cast from real[]).
        remote_exec(
            "parts",
            "CREATE TABLE bf_parts (id int, grp text, body text, embedding real[]) PARTITION BY LIST (grp);
             CREATE TABLE bf_parts_a PARTITION OF bf_parts FOR VALUES IN ('a');
             CREATE TABLE bf_parts_b PARTITION OF bf_parts FOR VALUES IN ('b') PARTITION BY RANGE (id);
             CREATE TABLE bf_parts_b1 PARTITION OF bf_parts_b FOR VALUES FROM (0) TO (50);
             CREATE TABLE bf_parts_b2 PARTITION OF bf_parts_b FOR VALUES FROM (50) TO (MAXVALUE);
             CREATE TABLE bf_parts_other PARTITION OF bf_parts DEFAULT;
             INSERT INTO bf_parts SELECT g, (ARRAY['a', 'b', 'c'])[1 + g % 3], 'partitioned passage ' || g
             FROM generate_series(1, 90) g;
             CREATE TABLE bf_parent (body text, embedding real[]);
             CREATE TABLE bf_child (extra int, body2 text) INHERITS (bf_parent);
             CREATE TABLE bf_child2 () INHERITS (bf_parent);
             INSERT INTO bf_parent (body) SELECT 'parent row ' || g FROM generate_series(1, 12) g;
             INSERT INTO bf_child (body) SELECT 'child row ' || g FROM generate_series(1, 12) g;
             INSERT INTO bf_child2 (body) SELECT 'second child row ' || g FROM generate_series(1, 12) g;
             CREATE EXTENSION IF NOT EXISTS vector; -- committed, and left for the other tests
             CREATE SCHEMA \"Back Fill\";
             CREATE TABLE \"Back Fill\".\"My Docs\" (\"Body\" text, \"Embedding\" vector);
             INSERT INTO \"Back Fill\".\"My Docs\" SELECT 'quoted ' || g FROM generate_series(1, 15) g;",
        );
        for call in [
            "CALL nvembed_backfill('bf_parts', 'body', 'embedding', batch_size => 7)",
            "CALL nvembed_backfill('bf_parent', 'body', 'embedding', batch_size => 5)",
            "CALL nvembed_backfill('\"Back Fill\".\"My Docs\"', 'Body', 'Embedding', batch_size => 4)",
        ] {
            remote_exec("parts", call);
        }
        assert_eq!(embedding_state("parts", "bf_parts", "body", "embedding"), "90,90,0");
        assert_eq!(embedding_state("parts", "bf_parent", "body", "embedding"), "36,36,0");
        assert_eq!(embedding_state("parts", "\"Back Fill\".\"My Docs\"", "\"Body\"", "\"Embedding\""), "15,15,0");
        // Every partition holds its own rows' vectors.
        let per_partition = remote_text(
            "parts",
            "SELECT string_agg(p || '=' || n, ' ' ORDER BY p) FROM (
                 SELECT tableoid::regclass::text AS p,
                        count(*) FILTER (WHERE (SELECT max(abs(x - y)) FROM unnest(embedding, nvembed_passage(body)) u(x, y)) <= 1e-6) AS n
                 FROM bf_parts GROUP BY 1) s",
        );
        assert_eq!(per_partition, "bf_parts_a=30 bf_parts_b1=17 bf_parts_b2=13 bf_parts_other=30");
        remote_exec("parts", "DROP TABLE bf_parts, bf_parent CASCADE; DROP SCHEMA \"Back Fill\" CASCADE");
        Spi::run("SELECT dblink_disconnect('parts')").unwrap();
    }

    /// Two-key advisory locks that session `pid` holds in nvembed_backfill's lock class.
    fn backfill_locks_held(pid: i32) -> i64 {
        Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1
               AND classid = 1853252198 AND objsubid = 2",
            &[pid.into()],
        )
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn backfill_never_writes_a_vector_of_a_text_the_row_no_longer_has() {
        use_fixture();
        remote_session("reader");
        remote_session("writer");
        let long = "The lighthouse beam sweeps across the water in slow, steady circles. ".repeat(600);
        let reader_pid = remote_text("reader", "SELECT pg_backend_pid()::text")
            .parse::<i32>()
            .unwrap();
        // Under READ COMMITTED the changed row's new version is not at the listed position any
        // more; under REPEATABLE READ the batch's snapshot still sees the old version there, and
        // locking it fails (40001) for that row only.
        for isolation in ["read committed", "repeatable read"] {
            remote_exec(
                "writer",
                &format!(
                    "CREATE TABLE bf_race (id int PRIMARY KEY, body text, embedding real[]);
                     INSERT INTO bf_race SELECT g, CASE g WHEN 1 THEN {} ELSE 'race row ' || g END FROM generate_series(1, 6) g",
                    pgrx::spi::quote_literal(&long)
                ),
            );
            remote_exec("reader", &format!("SET default_transaction_isolation = '{isolation}'"));
            // One batch of all rows in the reader's session; the first text (~8,000 tokens)
            // keeps the model busy for seconds.
            let batch = "SELECT concat_ws(',', b.embedded, b.locked, b.changed)
                         FROM (SELECT array_agg(tableoid) AS rels, array_agg(ctid) AS row_ids FROM bf_race) todo,
                              nvembed_backfill_batch('bf_race', 'body', 'embedding', 'passage', todo.rels, todo.row_ids) b";
            Spi::run_with_args("SELECT dblink_send_query('reader', $1)", &[batch.into()]).unwrap();
            let started = std::time::Instant::now();
            while backfill_locks_held(reader_pid) == 0 {
                assert!(seconds(started) < 10.0, "the batch never started");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // The batch has read its texts (right after taking the lock) and is embedding them:
            // change one text and commit, and hold another row locked.
            std::thread::sleep(std::time::Duration::from_millis(300));
            remote_exec("writer", "UPDATE bf_race SET body = 'a text written during the batch' WHERE id = 3");
            remote_exec("writer", "BEGIN");
            assert_eq!(remote_text("writer", "SELECT body FROM bf_race WHERE id = 5 FOR UPDATE"), "race row 5");
            assert_eq!(
                backfill_locks_held(reader_pid),
                1,
                "the batch ended before the update: make its first text longer"
            );
            let counts = Spi::get_one::<String>("SELECT v FROM dblink_get_result('reader') AS t(v text)")
                .unwrap()
                .unwrap();
            Spi::run("SELECT * FROM dblink_get_result('reader') AS t(v text)").unwrap();
            // Row 3 changed since read (left NULL), row 5 locked (skipped, not waited for).
            assert_eq!(counts, "4,1,1", "{isolation}");
            let left = remote_text(
                "reader",
                "SELECT string_agg(id::text, ',' ORDER BY id) FROM bf_race WHERE embedding IS NULL",
            );
            assert_eq!(left, "3,5", "{isolation}");
            remote_exec("writer", "COMMIT");
            // The next run fills both with their current texts.
            remote_exec("reader", "CALL nvembed_backfill('bf_race', 'body', 'embedding')");
            assert_eq!(embedding_state("reader", "bf_race", "body", "embedding"), "6,6,0", "{isolation}");
            remote_exec("writer", "DROP TABLE bf_race");
        }
        Spi::run("SELECT dblink_disconnect('reader'), dblink_disconnect('writer')").unwrap();
    }

    #[pg_test]
    fn backfill_runs_no_operator_from_the_callers_search_path() {
        use_fixture();
        remote_session("hostile");
        // A role's operators on the exact and the mixed types the procedure computes with, and
        // types named like the built-in ones, first in the caller's search_path: any use of them
        // fails the backfill. Its first batch always prints a progress NOTICE, so the rate and
        // ETA arithmetic runs too.
        let mut hostile = String::from(
            "CREATE SCHEMA bf_hostile;
             CREATE FUNCTION bf_hostile.trap() RETURNS boolean LANGUAGE plpgsql AS
               'BEGIN RAISE EXCEPTION ''hostile operator called''; END';
             CREATE TABLE bf_victim (body text, embedding real[]);
             INSERT INTO bf_victim SELECT 'victim row ' || g FROM generate_series(1, 20) g;",
        );
        for (i, (op, left, right)) in [
            ("/", "bigint", "double precision"),
            ("*", "bigint", "double precision"),
            ("/", "double precision", "double precision"),
            ("*", "double precision", "double precision"),
            ("/", "bigint", "bigint"),
            ("+", "bigint", "integer"),
            ("+", "bigint", "bigint"),
            ("-", "bigint", "integer"),
            ("-", "bigint", "bigint"),
            ("-", "timestamp with time zone", "timestamp with time zone"),
            ("-", "timestamp with time zone", "interval"),
            (">=", "interval", "interval"),
            ("<", "integer", "integer"),
            ("=", "text", "text"),
            ("=", "name", "text"),
            ("=", "oid", "oid"),
            ("=", "tid", "tid"),
            (">", "smallint", "integer"),
        ]
        .iter()
        .enumerate()
        {
            hostile.push_str(&format!(
                "CREATE FUNCTION bf_hostile.f{i}({left}, {right}) RETURNS boolean LANGUAGE sql AS 'SELECT bf_hostile.trap()';
                 CREATE OPERATOR bf_hostile.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = bf_hostile.f{i});"
            ));
        }
        // And types that shadow the built-in ones by name.
        for ty in ["text", "oid", "tid", "timestamptz"] {
            hostile.push_str(&format!("CREATE DOMAIN bf_hostile.{ty} AS pg_catalog.{ty} CHECK (bf_hostile.trap());"));
        }
        remote_exec("hostile", &hostile);
        remote_exec("hostile", "SET search_path = bf_hostile, public, pg_catalog");
        // The trap is armed: an unqualified operator in this session runs it.
        assert_error(
            "PERFORM dblink_exec('hostile', 'SELECT 1::bigint - 1::bigint')",
            "P0001",
            "hostile operator called",
        );
        remote_exec("hostile", "CALL nvembed_backfill('public.bf_victim', 'body', 'embedding', batch_size => 3)");
        remote_exec("hostile", "RESET search_path");
        assert_eq!(embedding_state("hostile", "bf_victim", "body", "embedding"), "20,20,0");
        remote_exec("hostile", "DROP SCHEMA bf_hostile CASCADE; DROP TABLE bf_victim");
        Spi::run("SELECT dblink_disconnect('hostile')").unwrap();
    }

    /// Restart count and pid of the model server.
    fn server_restarts_and_pid() -> (i64, i32) {
        let (restarts, pid) = Spi::get_two::<i64, i32>("SELECT restarts, pid FROM nvembed_status()").unwrap();
        (restarts.unwrap(), pid.unwrap())
    }

    /// SIGKILLs `pid` after `delay_ms`; the handle joins once the process is gone and reaped
    /// (a dying process' other threads may still hold its socket open while it is a zombie).
    fn kill_after(pid: i32, delay_ms: u64) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            // SAFETY: signalling a process by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    }

    #[pg_test]
    fn killing_the_idle_or_loading_model_process_recovers() {
        use_fixture_exclusively();
        embed_sql("nvembed_passage($1)", "warm up");
        // Idle: the next call is served by a new process.
        let (restarts, pid) = server_restarts_and_pid();
        kill_after(pid, 0).join().unwrap();
        assert_eq!(embed_sql("nvembed_passage($1)", "after an idle kill").len(), 32);
        let (after, new_pid) = server_restarts_and_pid();
        assert!(after > restarts && new_pid != pid);
        // While loading (config.json is a FIFO nobody writes): the waiting call errors promptly.
        let slow = format!("{FIXTURE}/slow-load-kill");
        let _ = std::fs::remove_dir_all(&slow);
        std::fs::create_dir_all(&slow).unwrap();
        let fifo = std::ffi::CString::new(format!("{slow}/config.json")).unwrap();
        // SAFETY: creating a FIFO at a path we own.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        serve_model(&slow);
        remote_session("loading");
        Spi::run("SELECT dblink_send_query('loading', 'SELECT nvembed_passage(''x'')')").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (_, loading_pid) = server_restarts_and_pid();
        let started = std::time::Instant::now();
        kill_after(loading_pid, 0).join().unwrap();
        assert_error("PERFORM * FROM dblink_get_result('loading') AS t(v real[])", "58000", "connection lost");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
        Spi::run("SELECT dblink_disconnect('loading')").unwrap();
        serve_model(&model_dir());
        assert_eq!(embed_sql("nvembed_passage($1)", "after a kill during load").len(), 32);
    }

    #[pg_test]
    fn every_kind_of_broken_checkpoint_is_named_and_recoverable() {
        use_fixture_exclusively();
        let cases: [(&str, fn(&str)); 3] = [
            ("tokenizer.json", |dir| std::fs::remove_file(format!("{dir}/tokenizer.json")).unwrap()),
            ("embedding_model.layers.0.self_attn.k_proj.weight", |dir| {
                let path = format!("{dir}/config.json");
                let config = std::fs::read_to_string(&path).unwrap();
                std::fs::write(&path, config.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 8"))
                    .unwrap();
            }),
            ("config.json", |dir| std::fs::write(format!("{dir}/config.json"), "{").unwrap()),
        ];
        for (i, (needle, breakage)) in cases.iter().enumerate() {
            let dir = fixture_copy(&format!("broken-{i}"));
            breakage(&dir);
            serve_model(&dir);
            assert_error("PERFORM nvembed_passage('x')", "F0000", needle);
        }
        serve_model(&model_dir());
        assert_eq!(embed_sql("nvembed_passage($1)", "fixed").len(), 32);
    }

    #[pg_test]
    fn bad_inputs_get_vectors_or_clear_errors() {
        use_fixture();
        for text in ["", "   \t\n  ", "😀"] {
            let v = embed_sql("nvembed_passage($1)", text);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5 && v.iter().all(|x| x.is_finite()), "{text:?}");
        }
        let nulls = Spi::get_one::<bool>(
            "SELECT nvembed_passage(NULL) IS NULL AND nvembed_query(NULL) IS NULL AND nvembed_query('x', NULL) IS NULL",
        )
        .unwrap();
        assert_eq!(nulls, Some(true));
        // 1 MB of text is truncated to nvembed.max_length tokens.
        Spi::run("SET nvembed.max_length = 512").unwrap();
        let huge = Spi::get_one::<Vec<f32>>("SELECT nvembed_passage(repeat('lighthouse ', 100000))")
            .unwrap()
            .unwrap();
        let cut = Spi::get_one::<Vec<f32>>("SELECT nvembed_passage(repeat('lighthouse ', 600))")
            .unwrap()
            .unwrap();
        assert!(max_abs_diff(&huge, &cut) <= 1e-6, "the same first 512 tokens give the same vector");
        assert_error("SET nvembed.max_length = -1", "22023", "max_length");
        // A custom task that leaves nothing to pool.
        Spi::run("SET nvembed.max_length = 8").unwrap();
        assert_error("PERFORM nvembed_query('x', 'a task whose instruction is long')", "22023", "nothing left to pool");
    }

    #[pg_test]
    fn garbage_on_the_socket_drops_that_connection_only() {
        use_fixture();
        use std::io::{Read, Write};
        for garbage in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            &[0xff, 0xff, 0xff, 0xff, 0, 1, 2][..],
            &[0, 0, 0, 3, b'{', b'}', b'x'][..],
        ] {
            let mut stream = std::os::unix::net::UnixStream::connect(nvembed_protocol::SOCKET_NAME).unwrap();
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            stream.write_all(garbage).unwrap();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut rest = Vec::new();
            let n = stream.read_to_end(&mut rest).unwrap_or(0);
            assert_eq!(n, 0, "the server answers garbage by closing");
        }
        assert_eq!(embed_sql("nvembed_passage($1)", "still serving").len(), 32);
    }

    #[pg_test]
    fn the_socket_is_private_to_the_server_user() {
        use_fixture();
        embed_sql("nvembed_passage($1)", "x");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(nvembed_protocol::SOCKET_NAME).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });
        let data_dir = std::fs::metadata(".").unwrap();
        assert_eq!(data_dir.permissions().mode() & 0o077, 0, "the data directory is closed to others");
    }

    #[pg_test]
    fn rollback_leaves_nothing_and_roles_keep_their_privileges() {
        use_fixture();
        Spi::run("CREATE TABLE rb (body text, e real[]);
                  CREATE TRIGGER t BEFORE INSERT ON rb FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'e')")
            .unwrap();
        Spi::run("DO $$ BEGIN INSERT INTO rb VALUES ('x'); RAISE EXCEPTION 'roll back'; EXCEPTION WHEN raise_exception THEN END $$")
            .unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM rb").unwrap(), Some(0));
        // A role that may read but not write the table cannot write through the trigger or backfill.
        Spi::run(
            "CREATE ROLE nvembed_reader; GRANT SELECT ON rb TO nvembed_reader; INSERT INTO rb (body) VALUES ('y')",
        )
        .unwrap();
        Spi::run("UPDATE rb SET e = NULL").unwrap();
        Spi::run("SET ROLE nvembed_reader").unwrap();
        assert_error("INSERT INTO rb VALUES ('z')", "42501", "permission denied");
        assert_error("CALL nvembed_backfill('rb', 'body', 'e')", "42501", "permission denied");
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM rb WHERE e IS NOT NULL").unwrap(), Some(0));
    }

    /// Seconds since `started`, for timing assertions.
    pub(crate) fn seconds(started: std::time::Instant) -> f64 {
        started.elapsed().as_secs_f64()
    }

    #[pg_test]
    fn cancel_during_a_long_batch_returns_promptly_and_others_are_served() {
        use_fixture_exclusively();
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        Spi::run_with_args("SELECT dblink_connect('long', $1)", &[self_connection().into()]).unwrap();
        let long = "The lighthouse beam sweeps across the water in slow, steady circles. ".repeat(2000);
        let call = format!("SELECT nvembed_passage({}) IS NOT NULL", pgrx::spi::quote_literal(&long));
        Spi::run_with_args("SELECT dblink_send_query('long', $1)", &[call.into()]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let started = std::time::Instant::now();
        let cancelled = Spi::get_one::<String>("SELECT dblink_cancel_query('long')")
            .unwrap()
            .unwrap();
        assert_eq!(cancelled, "OK");
        // Collect the cancelled query's outcome (an error, not raised here) and drain the result.
        Spi::run("SELECT * FROM dblink_get_result('long', false) AS t(ok bool)").unwrap();
        let result = Spi::get_one::<String>("SELECT dblink_error_message('long')")
            .unwrap()
            .unwrap();
        Spi::run("SELECT * FROM dblink_get_result('long', false) AS t(ok bool)").unwrap();
        assert!(seconds(started) < 1.0, "cancel took {:.2} s", seconds(started));
        assert!(result.contains("canceling statement"), "{result}");
        Spi::run("SELECT dblink_disconnect('long')").unwrap();
        // The model process lives on and serves the next call.
        assert_eq!(embed_sql("nvembed_passage($1)", "after a cancel").len(), 32);
    }

    #[pg_test]
    fn interrupted_backfill_resumes_with_exactly_one_correct_embedding_per_row() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        Spi::run_with_args("SELECT dblink_connect('bf2', $1)", &[self_connection().into()]).unwrap();
        let setup = format!(
            "CREATE TABLE resumable (id int PRIMARY KEY, body text, embedding real[], embedded_times int DEFAULT 0);
             CREATE FUNCTION count_embeddings() RETURNS trigger LANGUAGE plpgsql AS
               'BEGIN IF NEW.embedding IS NOT NULL AND OLD.embedding IS NULL THEN NEW.embedded_times := OLD.embedded_times + 1; END IF; RETURN NEW; END';
             CREATE TRIGGER c BEFORE UPDATE ON resumable FOR EACH ROW EXECUTE FUNCTION count_embeddings();
             INSERT INTO resumable (id, body) SELECT g, repeat('row ' || g || ' of a table being backfilled. ', 1 + g % 30) FROM generate_series(1, 3000) g;"
        );
        Spi::run_with_args("SELECT dblink_exec('bf2', $1)", &[setup.into()]).unwrap();
        let call = "CALL nvembed_backfill('resumable', 'body', 'embedding', 'passage', 16)";
        Spi::run_with_args("SELECT dblink_send_query('bf2', $1)", &[call.into()]).unwrap();
        // Cancelled once its first batches have committed: a fixed wait can end before the first
        // one on a loaded machine.
        let progress =
            "SELECT n FROM dblink($1, 'SELECT count(*) FROM resumable WHERE embedding IS NOT NULL') AS t(n bigint)";
        for _ in 0..600 {
            let done = Spi::get_one_with_args::<i64>(progress, &[self_connection().into()])
                .unwrap()
                .unwrap_or(0);
            if done > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Spi::run("SELECT dblink_cancel_query('bf2')").unwrap();
        for _ in 0..2 {
            // The cancelled CALL's error, then the end of its results.
            Spi::run("SELECT * FROM dblink_get_result('bf2', false) AS t(x text)").unwrap();
        }
        let done = Spi::get_one::<i64>(
            "SELECT n FROM dblink('bf2', 'SELECT count(*) FROM resumable WHERE embedding IS NOT NULL') AS t(n bigint)",
        )
        .unwrap()
        .unwrap();
        assert!(done > 0 && done < 3000, "interrupted part-way: {done} rows done");
        assert_eq!(done % 16, 0, "only whole batches were committed");
        Spi::run_with_args("SELECT dblink_exec('bf2', $1)", &[call.into()]).unwrap();
        let check = "SELECT count(*) FILTER (WHERE embedded_times = 1),
                            count(*) FILTER (WHERE (SELECT max(abs(x - y)) FROM unnest(embedding, nvembed_passage(body)) u(x, y)) <= 1e-6)
                     FROM resumable";
        let counts = Spi::get_one_with_args::<String>(
            "SELECT a || ',' || b FROM dblink('bf2', $1) AS t(a bigint, b bigint)",
            &[check.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(counts, "3000,3000");
        Spi::run("SELECT dblink_exec('bf2', 'DROP TABLE resumable; DROP FUNCTION count_embeddings()')").unwrap();
        Spi::run("SELECT dblink_disconnect('bf2')").unwrap();
    }

    #[pg_test]
    fn a_latin1_database_gets_the_same_vectors() {
        use_fixture();
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        let conn = self_connection();
        Spi::run_with_args(
            "SELECT dblink_exec($1, 'CREATE DATABASE nvembed_latin1 ENCODING ''LATIN1'' LC_COLLATE ''C'' LC_CTYPE ''C'' TEMPLATE template0')",
            &[conn.clone().into()],
        )
        .unwrap();
        let latin1 = conn.replace("dbname=", "dbname=nvembed_latin1 fallback_application_name=");
        Spi::run_with_args("SELECT dblink_connect('l1', $1)", &[latin1.into()]).unwrap();
        Spi::run("SELECT dblink_exec('l1', 'CREATE EXTENSION nvembed')").unwrap();
        let text = "Crème brûlée à Paris, naïve façade, Zürich";
        let got = Spi::get_one_with_args::<String>(
            "SELECT v FROM dblink('l1', format('SELECT nvembed_passage(%L)::text', $1::text)) AS t(v text)",
            &[text.into()],
        );
        // A task with non-ASCII text: the instruction is built in the database encoding too.
        let (query, task) = ("café", "Find the Öl");
        let got_task = Spi::get_one_with_args::<String>(
            "SELECT v FROM dblink('l1', format('SELECT nvembed_query(%L, %L)::text', $1::text, $2::text)) AS t(v text)",
            &[query.into(), task.into()],
        );
        Spi::run("SELECT dblink_disconnect('l1')").unwrap();
        Spi::run_with_args("SELECT dblink_exec($1, 'DROP DATABASE nvembed_latin1')", &[conn.into()]).unwrap();
        let got_task = parse_vector(&got_task.unwrap().unwrap());
        let want_task = Spi::get_one_with_args::<Vec<f32>>("SELECT nvembed_query($1, $2)", &[query.into(), task.into()])
            .unwrap()
            .unwrap();
        assert!(max_abs_diff(&got_task, &want_task) <= 1e-6);
        let got = got.map(|v| v.unwrap());
        match got {
            Ok(v) => assert!(max_abs_diff(&parse_vector(&v), &embed_sql("nvembed_passage($1)", text)) <= 1e-6),
            Err(e) => panic!("{e}"),
        }
    }

    #[pg_test]
    fn killing_the_model_process_mid_batch_fails_every_waiting_session_promptly() {
        use_fixture_exclusively();
        embed_sql("nvembed_passage($1)", "warm up");
        let (restarts, pid) = server_restarts_and_pid();
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        let long = "The lighthouse beam sweeps across the water in slow, steady circles. ".repeat(1500);
        for s in 0..3 {
            let name = format!("mk{s}");
            Spi::run_with_args("SELECT dblink_connect($1, $2)", &[name.clone().into(), self_connection().into()])
                .unwrap();
            let call =
                format!("SELECT nvembed_passage({}) IS NOT NULL", pgrx::spi::quote_literal(&format!("{long} {s}")));
            Spi::run_with_args("SELECT dblink_send_query($1, $2)", &[name.into(), call.into()]).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let waiting = Spi::get_one::<i64>("SELECT waiting FROM nvembed_status()")
            .unwrap()
            .unwrap();
        assert!(waiting >= 2, "the sessions' calls are queued or running together: {waiting}");
        let killed = std::time::Instant::now();
        let killer = kill_after(pid, 0);
        for s in 0..3 {
            let name = format!("mk{s}");
            Spi::run_with_args("SELECT * FROM dblink_get_result($1, false) AS t(ok bool)", &[name.clone().into()])
                .unwrap();
            let message = Spi::get_one_with_args::<String>("SELECT dblink_error_message($1)", &[name.clone().into()])
                .unwrap()
                .unwrap();
            assert!(message.contains("connection lost"), "session {s}: {message}");
            Spi::run_with_args("SELECT * FROM dblink_get_result($1, false) AS t(ok bool)", &[name.into()]).unwrap();
        }
        assert!(seconds(killed) < 2.0, "the waiting calls failed after {:.2} s", seconds(killed));
        killer.join().unwrap();
        for s in 0..3 {
            // Each session lives on and its next call works.
            let name = format!("mk{s}");
            let ok = Spi::get_one_with_args::<String>(
                "SELECT v FROM dblink($1, 'SELECT (array_length(nvembed_passage(''again''), 1) = 32)::text') AS t(v text)",
                &[name.clone().into()],
            )
            .unwrap();
            assert_eq!(ok.as_deref(), Some("true"));
            Spi::run_with_args("SELECT dblink_disconnect($1)", &[name.into()]).unwrap();
        }
        let (after, _) = server_restarts_and_pid();
        assert!(after > restarts);
    }

    /// A status column as text.
    pub(crate) fn status_value(column: &str) -> String {
        Spi::get_one::<String>(&format!("SELECT {column}::text FROM nvembed_status()"))
            .unwrap()
            .unwrap()
    }

    #[pg_test]
    fn searches_and_small_calls_pass_a_long_bulk_call_and_cancel_stops_its_compute() {
        use_fixture_exclusively();
        remote_session("bulk");
        remote_session("other");
        let bulk_pid: i32 = remote_text("bulk", "SELECT pg_backend_pid()::text").parse().unwrap();
        let cancelled_before: i64 = status_value("cancelled_rows").parse().unwrap();
        // ~7 s of bulk work on the tiny model: 40 texts of ~1,400 tokens.
        let call = "SELECT count(*) FROM nvembed_passages(ARRAY(SELECT g || repeat(' The lighthouse beam sweeps \
                    across the water in slow, steady circles.', 100) FROM generate_series(1, 40) g))";
        Spi::run_with_args("SELECT dblink_send_query('bulk', $1)", &[call.into()]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        // A search from another session is served at once, with the right vector.
        let started = std::time::Instant::now();
        let got = remote_text("other", "SELECT nvembed_query('where is the lighthouse?')::text");
        let search = seconds(started);
        let want = embed_sql("nvembed_query($1)", "where is the lighthouse?");
        let got: Vec<f32> = got
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(max_abs_diff(&got, &want) <= 1e-6);
        assert!(search < 1.5, "a search waited {search:.2} s behind bulk work");
        // A small batch call is answered when its own rows are done, not after the long call.
        let started = std::time::Instant::now();
        assert_eq!(remote_text("other", "SELECT count(*)::text FROM nvembed_passages(ARRAY['a', 'b', 'c'])"), "3");
        let small = seconds(started);
        assert!(small < 3.0, "a 3-text call took {small:.2} s");
        let busy = Spi::get_one::<i32>("SELECT dblink_is_busy('bulk')").unwrap();
        assert_eq!(busy, Some(1), "the long call should still be running");
        // (Sampled until seen: between two of its passes the call has no active rows.)
        let sampled = std::time::Instant::now();
        while status_value("active_rows").parse::<i64>().unwrap() == 0 {
            assert!(seconds(sampled) < 1.0, "the long call has no rows in the model");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Cancelling the long call stops its compute within a layer's time.
        Spi::run(&format!("SELECT pg_cancel_backend({bulk_pid})")).unwrap();
        let cancelled = std::time::Instant::now();
        while status_value("active_rows") != "0" {
            assert!(seconds(cancelled) < 2.0, "the model still computes for a cancelled call");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let tokens = status_value("tokens");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(status_value("tokens"), tokens, "no more rows were finished after the cancel");
        assert!(status_value("cancelled_rows").parse::<i64>().unwrap() > cancelled_before);
        assert_error(
            "PERFORM * FROM dblink_get_result('bulk') AS t(n bigint)",
            "57014",
            "canceling statement due to user request",
        );
        Spi::run("SELECT dblink_disconnect('bulk'), dblink_disconnect('other')").unwrap();
    }

    #[pg_test]
    fn admission_limits_refuse_oversized_calls_before_any_compute() {
        use_fixture_exclusively();
        remote_session("adm");
        alter_system("ALTER SYSTEM SET nvembed.max_length_limit = 64");
        alter_system("ALTER SYSTEM SET nvembed.max_request_tokens = 100");
        // The remote session reads the new values once the reload reaches it.
        let started = std::time::Instant::now();
        while remote_text("adm", "SELECT current_setting('nvembed.max_request_tokens')") != "100" {
            assert!(seconds(started) < 10.0);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let requests = status_value("requests");
        let refused = |sql: &str, needle: &str, hint: &str| {
            let check = format!(
                "DO $t$ DECLARE m text; h text; BEGIN PERFORM dblink_exec('adm', {});
                   RAISE EXCEPTION 'no error raised';
                 EXCEPTION WHEN program_limit_exceeded THEN
                   GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT;
                   IF position({} in m) = 0 OR position({} in h) = 0 THEN RAISE EXCEPTION '% / %', m, h; END IF;
                 END $t$",
                pgrx::spi::quote_literal(sql),
                pgrx::spi::quote_literal(needle),
                pgrx::spi::quote_literal(hint),
            );
            Spi::run(&check).unwrap();
        };
        remote_exec("adm", "SET nvembed.max_length = 65");
        refused(
            "SELECT nvembed_passage('x')",
            "nvembed.max_length (65) exceeds nvembed.max_length_limit (64)",
            "raise nvembed.max_length_limit in postgresql.conf",
        );
        remote_exec("adm", "SET nvembed.max_length = 64");
        // 30 texts of 5 tokens each ("<s>", 3 tokens, "</s>") = 150 tokens > 100: refused at
        // the 14th text, when its 70 tokens and at least 2 for each of the 16 still to come
        // pass the limit.
        refused(
            "SELECT count(*) FROM nvembed_passages(array_fill('boats at sea'::text, ARRAY[30]))",
            "the call submits at least 102 tokens in 30 texts, more than nvembed.max_request_tokens (100)",
            "raise nvembed.max_request_tokens in postgresql.conf",
        );
        // A text longer than nvembed.max_length counts only its kept tokens: 64 ≤ 100.
        assert_eq!(remote_text("adm", "SELECT array_length(nvembed_passage(repeat('boats ', 500)), 1)::text"), "32");
        assert_eq!(status_value("requests").parse::<i64>().unwrap(), requests.parse::<i64>().unwrap() + 1);
        alter_system("ALTER SYSTEM RESET nvembed.max_length_limit");
        alter_system("ALTER SYSTEM RESET nvembed.max_request_tokens");
        Spi::run("SELECT dblink_disconnect('adm')").unwrap();
    }

    #[pg_test]
    fn status_is_for_monitoring_roles_and_preload_loads_at_start() {
        use_fixture_exclusively();
        Spi::run("CREATE ROLE nvembed_status_plain").unwrap();
        Spi::run("CREATE ROLE nvembed_status_monitor IN ROLE pg_monitor").unwrap();
        Spi::run("SET ROLE nvembed_status_plain").unwrap();
        assert_error("PERFORM * FROM nvembed_status()", "42501", "permission denied for function nvembed_status");
        Spi::run("RESET ROLE").unwrap();
        Spi::run("SET ROLE nvembed_status_monitor").unwrap();
        assert_eq!(status_value("server_running"), "true");
        Spi::run("RESET ROLE").unwrap();
        // With nvembed.preload the restarted server loads the model before any call.
        let (_, pid) = server_restarts_and_pid();
        alter_system("ALTER SYSTEM SET nvembed.preload = on");
        let started = std::time::Instant::now();
        loop {
            let (loaded, now) = Spi::get_two::<bool, i32>("SELECT loaded, pid FROM nvembed_status()").unwrap();
            if loaded == Some(true) && now.is_some_and(|p| p != pid) {
                break;
            }
            assert!(seconds(started) < 30.0, "the preloading server did not load the model");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(status_value("requests"), "0", "loaded with no call");
        // Back to lazy loading; the next test must not meet the preloading server being stopped.
        let (_, preloading) = server_restarts_and_pid();
        alter_system("ALTER SYSTEM RESET nvembed.preload");
        let started = std::time::Instant::now();
        while Spi::get_one::<i32>("SELECT pid FROM nvembed_status()")
            .unwrap()
            .is_none_or(|p| p == preloading)
        {
            assert!(seconds(started) < 30.0, "the model server was not restarted without preload");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    #[pg_test]
    fn a_model_that_outputs_nan_gives_a_named_error_never_a_nan_vector() {
        use_fixture_exclusively();
        // A copy of the fixture whose final decoder norm weights are NaN.
        let dir = fixture_copy("nan-weights");
        let name = "embedding_model.norm.weight";
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/model.safetensors.index.json")).unwrap())
                .unwrap();
        let shard = format!("{dir}/{}", index["weight_map"][name].as_str().unwrap());
        let mut bytes = std::fs::read(&shard).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let (start, end) = (
            header[name]["data_offsets"][0].as_u64().unwrap() as usize,
            header[name]["data_offsets"][1].as_u64().unwrap() as usize,
        );
        let nan = match header[name]["dtype"].as_str().unwrap() {
            "F32" => f32::NAN.to_le_bytes().to_vec(),
            "BF16" | "F16" => vec![0xc0, 0x7f],
            other => panic!("unexpected dtype {other}"),
        };
        for chunk in bytes[8 + header_len + start..8 + header_len + end].chunks_mut(nan.len()) {
            chunk.copy_from_slice(&nan);
        }
        std::fs::write(&shard, bytes).unwrap();
        serve_model(&dir);
        assert_error("PERFORM nvembed_passage('x')", "22P01", "non-finite value (NaN or infinity)");
        assert_error("PERFORM count(*) FROM nvembed_passages(ARRAY['x', 'y'])", "22P01", "non-finite value");
        serve_model(&model_dir());
        assert_eq!(embed_sql("nvembed_passage($1)", "finite again").len(), 32);
    }
}
