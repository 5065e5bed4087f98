-- nvembed 0.1.0 -> 0.2.0, run by ALTER EXTENSION nvembed UPDATE.
-- 0.2.0 adds the vectorizers (tables, views, event triggers, workers' functions) and chunk
-- vectorizers with nvembed_chunks() (sql/chunks.sql),
-- nvembed_model_dimension(), nvembed_transaction_control_allowed(), nvembed_backfill_embed() and
-- nvembed_backfill_batch(), and search (nvembed_search, nvembed_search_documents,
-- nvembed_create_search_index and their
-- helpers, sql/search.sql); it changes nvembed_status()'s columns (one row per model server),
-- nvembed_task_instruction() (now C, sharing the Rust constants), the trigger's rules and the
-- backfill, and makes the set-returning functions non-STRICT (so PostgreSQL inlines them in FROM
-- and a LIMIT or a cursor stops their compute). Functions 0.1.0 already had keep their OIDs (CREATE OR REPLACE), so users' views and
-- functions that call them survive; only nvembed_status(), whose result type changed, is dropped
-- and created again. scripts/lifecycle-tests.sh checks that an updated installation has exactly
-- the objects, definitions and privileges of a fresh 0.2.0 one.
\echo Use "ALTER EXTENSION nvembed UPDATE" to load this file. \quit

DROP FUNCTION @extschema@.nvembed_status();

CREATE FUNCTION "nvembed_model_dimension"() RETURNS INT /* Option < i32 > */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'nvembed_model_dimension_wrapper';

CREATE FUNCTION "nvembed_transaction_control_allowed"() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'nvembed_transaction_control_allowed_wrapper';

CREATE FUNCTION "nvembed_status"() RETURNS TABLE (
	"server_running" bool,  /* bool */
	"loaded" bool,  /* bool */
	"model" TEXT,  /* Option < String > */
	"dtype" TEXT,  /* Option < String > */
	"device" TEXT,  /* Option < String > */
	"dimension" INT,  /* Option < i32 > */
	"load_seconds" double precision,  /* Option < f64 > */
	"requests" bigint,  /* i64 */
	"tokens" bigint,  /* i64 */
	"rows" bigint,  /* i64 */
	"waiting" bigint,  /* i64 */
	"active_rows" bigint,  /* i64 */
	"cancelled_rows" bigint,  /* i64 */
	"restarts" bigint,  /* i64 */
	"pid" INT,  /* Option < i32 > */
	"server" TEXT,  /* String */
	"revision" TEXT,  /* Option < String > */
	"last_error" TEXT  /* Option < String > */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'nvembed_server_status_wrapper';

-- nvembed_status() shows the model's path and the server's process id: for monitoring roles,
-- not for every role (PUBLIC may execute any new function by default).

REVOKE EXECUTE ON FUNCTION @extschema@.nvembed_status() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION @extschema@.nvembed_status() TO pg_monitor;

CREATE OR REPLACE FUNCTION "nvembed_task_instruction"(
	"task" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'nvembed_task_instruction_wrapper';

-- Inlined in FROM only when not STRICT; the STRICT C function they call still gives no rows
-- for NULL (see functions.sql).
ALTER FUNCTION @extschema@.nvembed_embed_many(text[], text) CALLED ON NULL INPUT;
ALTER FUNCTION @extschema@.nvembed_passages(text[]) CALLED ON NULL INPUT;
ALTER FUNCTION @extschema@.nvembed_queries(text[]) CALLED ON NULL INPUT;
ALTER FUNCTION @extschema@.nvembed_queries(text[], text) CALLED ON NULL INPUT;

-- nvembed_embed_trigger(source_column, target_column [, 'passage' | 'query'])
--
-- BEFORE INSERT OR UPDATE ... FOR EACH ROW (on a plain table, or on a partitioned parent, where
-- it fires for rows routed to any partition). Rules:
--   INSERT  a non-NULL target is kept (COPY of precomputed vectors, pg_restore --data-only,
--           logical replication with ENABLE ALWAYS); a NULL target gets the source's embedding.
--   UPDATE  the source changed: re-embed, unless the same statement also set the target to
--           another non-NULL vector (writing back the old vector, as ORMs do, or NULL re-embeds);
--           the source is unchanged: a NULL target is filled, any other target is kept.
-- A NULL source gives a NULL embedding. A generated source column is refused (it is computed
-- after BEFORE triggers; a vectorizer embeds it). This must be the last BEFORE trigger to fire
-- (they fire in name order): a warning (once per transaction and table) names any that fires
-- after it. Only the two named columns are read, and only the target is written: the row is
-- never converted as a whole (a 4096-float vector is ~50 KB of text). The target may be
-- vector(N), halfvec(N) or real[]: the value is assigned through the column type's own input,
-- exactly as an INSERT of the array would be.
CREATE OR REPLACE FUNCTION nvembed_embed_trigger() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- The new vector reaches the column as JSON numbers: shortest exact float output, whatever the
-- session's extra_float_digits.
SET extra_float_digits = 3
AS $$
DECLARE
    source_column text := TG_ARGV[0];
    target_column text := TG_ARGV[1];
    kind text := coalesce(TG_ARGV[2], 'passage');
    source_text text;
    target_is_null boolean;
    source_changed boolean;
    target_set boolean;
    embedding real[];
    -- What the dynamic reads below get instead of NEW itself: passing a row to EXECUTE flattens
    -- it, fetching its out-of-line (TOASTed) values into it, and a NEW flattened that way would
    -- make the UPDATE store its unchanged long values (the vector, the text) again.
    new_row record;
    later_trigger name;
BEGIN
    IF TG_WHEN <> 'BEFORE' OR TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE') THEN
        RAISE EXCEPTION 'nvembed_embed_trigger must be a BEFORE INSERT OR UPDATE ... FOR EACH ROW trigger'
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'CREATE TRIGGER ... BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger(''body'', ''embedding'')';
    END IF;
    IF TG_NARGS NOT IN (2, 3) OR kind NOT IN ('passage', 'query') THEN
        RAISE EXCEPTION 'nvembed_embed_trigger expects (source_column, target_column [, ''passage'' | ''query''])'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0..1 LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                       WHERE attrelid = TG_RELID AND attname = TG_ARGV[i] AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'column "%" of relation %.% does not exist', TG_ARGV[i], TG_TABLE_SCHEMA, TG_TABLE_NAME
                USING ERRCODE = 'undefined_column',
                      HINT = 'Check the column names given to nvembed_embed_trigger in the trigger definition.';
        END IF;
    END LOOP;
    -- A generated column is computed after the BEFORE triggers: here it is still NULL, so its
    -- row would get no vector, and an UPDATE would see the text "changed" to NULL.
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = TG_RELID AND attname = source_column AND attgenerated <> '') THEN
        RAISE EXCEPTION 'nvembed_embed_trigger cannot embed generated column "%" of %.%: a BEFORE trigger runs before it is computed',
                source_column, TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'feature_not_supported',
                  HINT = format('Drop the trigger and use a vectorizer, which embeds the stored value: SELECT nvembed_create_vectorizer(%L, %L, %L);',
                                format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), source_column, target_column);
    END IF;
    -- BEFORE triggers fire in name order: one that sorts after this one may still change the
    -- text that was embedded here, leaving a vector of a text the row does not have.
    later_trigger := (SELECT min(t.tgname COLLATE "C") FROM pg_trigger t
                      WHERE t.tgrelid = TG_RELID AND t.tgname > TG_NAME COLLATE "C" AND t.tgenabled <> 'D' AND NOT t.tgisinternal
                        AND t.tgtype & (1 | 2) = (1 | 2) -- ROW, BEFORE
                        AND t.tgtype & CASE TG_OP WHEN 'INSERT' THEN 4 ELSE 16 END <> 0);
    -- Once per transaction and table (a bulk write would repeat it for every row).
    IF later_trigger IS NOT NULL
       AND NOT coalesce(TG_RELID::text = ANY (string_to_array(current_setting('nvembed_trigger.order_warned', true), ',')), false) THEN
        PERFORM set_config('nvembed_trigger.order_warned',
                           concat_ws(',', nullif(current_setting('nvembed_trigger.order_warned', true), ''), TG_RELID::text), true);
        RAISE WARNING 'trigger "%" on %.% fires after nvembed''s trigger "%": a change it makes to "%" is not embedded',
                later_trigger, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_NAME, source_column
            USING HINT = format('BEFORE triggers fire in name order: rename nvembed''s so that it fires last, e.g. ALTER TRIGGER %I ON %I.%I RENAME TO %I;',
                                TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, 'zz_' || TG_NAME);
    END IF;
    new_row := NEW;
    IF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT ($1).%I IS NULL', target_column) INTO target_is_null USING new_row;
        IF NOT target_is_null THEN
            RETURN NEW;
        END IF;
    ELSE
        -- Byte-for-byte image comparison (*=): no equality operator of the column types needed,
        -- and "changed" means any change. The target is compared only when the source changed.
        EXECUTE format('SELECT NOT (ROW(($1).%1$I)::record *= ROW(($2).%1$I)::record), ($1).%2$I IS NULL',
                       source_column, target_column)
            INTO source_changed, target_is_null USING new_row, OLD;
        IF source_changed THEN
            EXECUTE format('SELECT NOT (ROW(($1).%1$I)::record *= ROW(($2).%1$I)::record)', target_column)
                INTO target_set USING new_row, OLD;
            IF target_set AND NOT target_is_null THEN
                RETURN NEW;
            END IF;
        ELSIF NOT target_is_null THEN
            RETURN NEW;
        END IF;
    END IF;
    EXECUTE format('SELECT ($1).%I::text', source_column) INTO source_text USING new_row;
    IF source_text IS NULL THEN
        embedding := NULL;
        IF target_is_null THEN
            RETURN NEW;
        END IF;
    ELSIF kind = 'query' THEN
        embedding := @extschema@.nvembed_query(source_text);
    ELSE
        embedding := @extschema@.nvembed_passage(source_text);
    END IF;
    RETURN jsonb_populate_record(NEW, jsonb_build_object(target_column, to_jsonb(embedding)));
END;
$$;

-- CREATE TRIGGER ... nvembed_embed_trigger on a generated source column is refused when it is
-- made, not at the table's next write (the trigger function refuses it too, as a backstop).
CREATE FUNCTION nvembed_embed_trigger_on_create() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    refused record;
BEGIN
    SELECT t.tgname, t.tgrelid::regclass AS rel, a.attname INTO refused
    FROM pg_event_trigger_ddl_commands() d
    JOIN pg_trigger t ON d.classid = 'pg_trigger'::regclass AND t.oid = d.objid
    JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attname = (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1]
    WHERE t.tgfoid = '@extschema@.nvembed_embed_trigger()'::regprocedure AND a.attgenerated <> ''
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'nvembed_embed_trigger cannot embed generated column "%" of %: a BEFORE trigger runs before it is computed',
                refused.attname, refused.rel
            USING ERRCODE = 'feature_not_supported',
                  HINT = format('Use a vectorizer, which embeds the stored value: SELECT nvembed_create_vectorizer(%L, %L, ...);',
                                refused.rel, refused.attname);
    END IF;
END;
$$;

CREATE EVENT TRIGGER nvembed_embed_trigger_on_create ON ddl_command_end WHEN TAG IN ('CREATE TRIGGER')
    EXECUTE FUNCTION nvembed_embed_trigger_on_create();

-- CALL nvembed_backfill(tbl, source_column, target_column [, kind [, batch_size]])
--
-- Embeds every row whose target is NULL and whose source is not, batch_size rows per model
-- round trip, committing after each batch: an interrupted run loses at most one batch, and a
-- re-run continues where it stopped.
--
-- A run first lists the positions of the rows to embed, once (one scan; the list is kept across
-- COMMITs), then works through the list batch by batch, so each batch costs only its own rows
-- whatever the table's size, and each row is visited once: rows that cannot be written (locked,
-- changed, hidden by row-level security, cancelled by a trigger) never make it loop, and rows
-- inserted or changed during the run are left for the next one.
--
-- Rows are identified by (tableoid, ctid), not by ctid alone (unique only inside one partition or
-- inheritance child) and not by primary key (tables without one must work too, and a key may span
-- several columns of any type). A position may come to hold another row (after a DELETE and a
-- VACUUM), so it is trusted only together with the text re-checked at the write.

-- The vectors of `texts` (a two-dimensional array, one row per text, in order) from
-- `embed_call`, in as few calls as nvembed.max_request_tokens allows: a call the model server
-- refuses as too large (refused before any compute; long documents reach the limit at a few
-- dozen texts) is split in halves until the parts fit. A single text that does not fit fails as
-- it would alone.
CREATE FUNCTION nvembed_backfill_embed(embed_call text, texts text[]) RETURNS real[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    vectors real[];
    half integer := cardinality(texts) / 2;
BEGIN
    EXECUTE format('SELECT array_agg(e ORDER BY n) FROM %s($1) WITH ORDINALITY AS v(e, n)', embed_call)
        INTO vectors USING texts;
    RETURN vectors;
EXCEPTION WHEN program_limit_exceeded THEN
    IF half = 0 OR SQLERRM NOT LIKE '%nvembed.max_request_tokens%' THEN
        RAISE;
    END IF;
    RETURN @extschema@.nvembed_backfill_embed(embed_call, texts[1:half])
        || @extschema@.nvembed_backfill_embed(embed_call, texts[half + 1:]);
END;
$$;

-- One batch of nvembed_backfill: the rows at positions (rels[i], row_ids[i]), in one transaction
-- (the caller commits):
--   1. read the texts of those rows that still need a vector, WITHOUT locking them: the model
--      call that follows takes seconds per row with the real model, and holding row locks that
--      long would stall the application's UPDATEs;
--   2. embed them in one model round trip;
--   3. claim the rows whose source is still byte-for-byte the text that was embedded and whose
--      target is still NULL, FOR NO KEY UPDATE SKIP LOCKED (the lock the UPDATE itself takes;
--      rows another session holds are skipped and counted, never waited for);
--   4. write the claimed rows, re-checking the text in the UPDATE's WHERE.
-- Returns how many rows it embedded, skipped because another session held them locked, and
-- skipped because they changed, went away or were filled since the run listed them.
-- Concurrent batches on the same table (as named) take turns (a transaction-level advisory lock),
-- so no text is embedded twice. A plain function, so it can pin search_path.
CREATE FUNCTION nvembed_backfill_batch(
    tbl regclass, source_column text, target_column text, kind text, rels oid[], row_ids tid[],
    OUT embedded integer, OUT locked integer, OUT changed integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Advisory lock class of nvembed_backfill ('nvbf'); the second key is the table.
    backfill_lock_class CONSTANT integer := 1853252198;
    embed_call text;
    todo_rels oid[];
    todo_rows tid[];
    texts text[];
    vectors real[]; -- two-dimensional: one row per text, in batch order
    claim text;
    write text;
    claimed_rels oid[];
    claimed_rows tid[];
    claimed_n bigint[];
    matching integer;
    written integer;
    -- The row still holds the text that was embedded (byte-for-byte: a nondeterministic
    -- collation could call different texts equal) and still needs a vector.
    unchanged text := format('t.%1$I IS NULL AND (t.%2$I::text COLLATE "C") = b.src', target_column, source_column);
BEGIN
    embed_call := CASE kind WHEN 'passage' THEN '@extschema@.nvembed_passages'
                            WHEN 'query' THEN '@extschema@.nvembed_queries' END;
    IF embed_call IS NULL THEN
        RAISE EXCEPTION 'nvembed_backfill: kind must be ''passage'' or ''query'', not %', quote_nullable(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    embedded := 0;
    locked := 0;
    PERFORM pg_advisory_xact_lock(backfill_lock_class, tbl::oid::integer);

    EXECUTE format(
        'SELECT array_agg(b.rel ORDER BY b.n), array_agg(b.row_id ORDER BY b.n), array_agg(t.%1$I::text ORDER BY b.n)
         FROM unnest($1::oid[], $2::tid[]) WITH ORDINALITY AS b(rel, row_id, n)
         JOIN %2$s AS t ON t.tableoid = b.rel AND t.ctid = b.row_id
         WHERE t.%3$I IS NULL AND t.%1$I IS NOT NULL',
        source_column, tbl, target_column)
        INTO todo_rels, todo_rows, texts USING rels, row_ids;

    IF texts IS NOT NULL THEN
        vectors := @extschema@.nvembed_backfill_embed(embed_call, texts);

        claim := format(
            'WITH b AS (SELECT * FROM unnest($1::oid[], $2::tid[], $3::text[], $4::bigint[]) AS b(rel, row_id, src, n)),
                  matching AS (SELECT 1 FROM %1$s AS t JOIN b ON t.tableoid = b.rel AND t.ctid = b.row_id WHERE %2$s),
                  claimed AS (SELECT t.tableoid AS rel, t.ctid AS row_id, b.n
                              FROM %1$s AS t JOIN b ON t.tableoid = b.rel AND t.ctid = b.row_id WHERE %2$s
                              FOR NO KEY UPDATE OF t SKIP LOCKED)
             SELECT (SELECT count(*) FROM matching), array_agg(rel), array_agg(row_id), array_agg(n) FROM claimed',
            tbl, unchanged);
        write := format(
            'UPDATE %1$s AS t SET %2$I = ARRAY(SELECT unnest($4[b.n:b.n][:]))
             FROM (SELECT c.rel, c.row_id, c.n::integer AS n, $5[c.n] AS src
                   FROM unnest($1::oid[], $2::tid[], $3::bigint[]) AS c(rel, row_id, n)) b
             WHERE t.tableoid = b.rel AND t.ctid = b.row_id AND %3$s',
            tbl, target_column, unchanged);
        -- Claim and write in one (sub)transaction: rows locked by one transaction id and
        -- updated by another would each need a MultiXact.
        BEGIN
            EXECUTE claim INTO matching, claimed_rels, claimed_rows, claimed_n
                USING todo_rels, todo_rows, texts, ARRAY(SELECT generate_series(1, cardinality(texts)));
            locked := matching - coalesce(cardinality(claimed_n), 0);
            IF claimed_n IS NOT NULL THEN
                EXECUTE write USING claimed_rels, claimed_rows, claimed_n, vectors, texts;
                GET DIAGNOSTICS embedded = ROW_COUNT;
            END IF;
        EXCEPTION WHEN serialization_failure THEN
            -- A row was moved to another partition, or (REPEATABLE READ) changed since this
            -- transaction's snapshot: claim and write row by row, leaving the rows that fail.
            locked := 0;
            embedded := 0;
            FOR i IN 1..cardinality(texts) LOOP
                BEGIN
                    EXECUTE claim INTO matching, claimed_rels, claimed_rows, claimed_n
                        USING ARRAY[todo_rels[i]], ARRAY[todo_rows[i]], ARRAY[texts[i]], ARRAY[i::bigint];
                    locked := locked + matching - coalesce(cardinality(claimed_n), 0);
                    IF claimed_n IS NOT NULL THEN
                        EXECUTE write USING claimed_rels, claimed_rows, claimed_n, vectors, texts;
                        GET DIAGNOSTICS written = ROW_COUNT;
                        embedded := embedded + written;
                    END IF;
                EXCEPTION WHEN serialization_failure THEN
                    NULL;
                END;
            END LOOP;
        END;
    END IF;
    changed := cardinality(rels) - embedded - locked;
END;
$$;

CREATE OR REPLACE PROCEDURE nvembed_backfill(tbl regclass, source_column text, target_column text,
                                  kind text DEFAULT 'passage', batch_size integer DEFAULT 64)
LANGUAGE plpgsql
-- SECURITY INVOKER: it writes only what the calling role could write itself. A procedure that
-- COMMITs cannot carry a SET search_path clause, so every type, function and operator below is
-- schema-qualified (an unqualified operator on mixed types would run whatever a role put first
-- in the caller's search_path: CVE-2018-1058); the batch function pins its own search_path.
AS $$
DECLARE
    progress_interval CONSTANT interval := '2 s';
    still_null bigint;
    visited bigint := 0;
    embedded bigint := 0;
    locked bigint := 0;
    changed bigint := 0;
    started pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    -- The first batch reports at once: with the real model it may take minutes.
    last_notice pg_catalog.timestamptz := started OPERATOR(pg_catalog.-) progress_interval;
    elapsed double precision;
    todo pg_catalog.record;
    batch pg_catalog.record;
    column_name pg_catalog.text;
BEGIN
    IF kind IS NULL OR NOT (kind OPERATOR(pg_catalog.=) ANY (ARRAY['passage', 'query'])) THEN
        RAISE EXCEPTION 'nvembed_backfill: kind must be ''passage'' or ''query'', not %', pg_catalog.quote_nullable(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch_size IS NULL OR batch_size OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'nvembed_backfill: batch_size must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH column_name IN ARRAY ARRAY[source_column, target_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                       WHERE attrelid OPERATOR(pg_catalog.=) tbl AND attname OPERATOR(pg_catalog.=) column_name
                         AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'column "%" of relation % does not exist', column_name, tbl
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;
    -- Before any model call: a role that may not write the target would only waste the compute.
    IF NOT pg_catalog.has_column_privilege(tbl, target_column, 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied to update column "%" of relation %', target_column, tbl
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Before any work: it COMMITs after each batch, which a transaction block (BEGIN, psql -1, a
    -- driver without autocommit) or a calling function would refuse only after the first
    -- batch's compute.
    IF NOT @extschema@.nvembed_transaction_control_allowed() THEN
        RAISE EXCEPTION 'nvembed_backfill cannot run inside a transaction block: it commits after each batch'
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'CALL it as a statement of its own, outside BEGIN ... COMMIT and not from a function (psql: without -1 or --single-transaction; psycopg: autocommit = True; JDBC: setAutoCommit(true)).';
    END IF;
    -- The positions of the rows to embed, cut into batches, each carrying the total; the loop's
    -- query result is kept (materialised) across the COMMITs below.
    FOR todo IN EXECUTE pg_catalog.format(
        'SELECT pg_catalog.array_agg(tableoid) AS rels, pg_catalog.array_agg(ctid) AS row_ids,
                (pg_catalog.sum(pg_catalog.count(*)) OVER ())::bigint AS total
         FROM (SELECT tableoid, ctid, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) $1 AS batch_no
               FROM %s WHERE %I IS NULL AND %I IS NOT NULL) rows_to_embed
         GROUP BY batch_no ORDER BY batch_no',
        tbl, target_column, source_column) USING batch_size::bigint
    LOOP
        SELECT * INTO batch FROM @extschema@.nvembed_backfill_batch(
            tbl, source_column, target_column, kind, todo.rels, todo.row_ids);
        COMMIT;
        visited := visited OPERATOR(pg_catalog.+) pg_catalog.cardinality(todo.rels);
        embedded := embedded OPERATOR(pg_catalog.+) batch.embedded;
        locked := locked OPERATOR(pg_catalog.+) batch.locked;
        changed := changed OPERATOR(pg_catalog.+) batch.changed;
        IF pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) last_notice OPERATOR(pg_catalog.>=) progress_interval THEN
            last_notice := pg_catalog.clock_timestamp();
            elapsed := GREATEST(pg_catalog.date_part('epoch', last_notice OPERATOR(pg_catalog.-) started), 1e-6);
            RAISE NOTICE 'nvembed_backfill: % of % rows, % embedded, % rows/s, ETA % s', visited, todo.total, embedded,
                pg_catalog.round((embedded::double precision OPERATOR(pg_catalog./) elapsed)::numeric, 1),
                pg_catalog.round(((todo.total OPERATOR(pg_catalog.-) visited)::double precision
                                  OPERATOR(pg_catalog.*) elapsed OPERATOR(pg_catalog./) visited::double precision)::numeric, 0);
        END IF;
    END LOOP;
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL',
                              tbl, target_column, source_column) INTO still_null;
    elapsed := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) started);
    RAISE NOTICE 'nvembed_backfill: done in % s: % rows embedded, % skipped (locked by another session), % skipped (changed, deleted or filled meanwhile); % rows with a non-NULL % still have a NULL %',
        pg_catalog.round(elapsed::numeric, 1), embedded, locked, changed, still_null,
        pg_catalog.quote_ident(source_column), pg_catalog.quote_ident(target_column);
END;
$$;

CREATE FUNCTION "nvembed_chunk_settings"(
	"max_tokens" INT, /* Option < i32 > */
	"overlap" INT /* Option < i32 > */
) RETURNS TABLE (
	"max_tokens" INT,  /* i32 */
	"overlap" INT  /* i32 */
)
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'nvembed_chunk_settings_wrapper';

CREATE FUNCTION "nvembed_chunks_utf8"(
	"document" bytea, /* Option < & [u8] > */
	"kind" TEXT, /* Option < & str > */
	"instruction" bytea, /* Option < & [u8] > */
	"max_tokens" INT, /* Option < i32 > */
	"overlap" INT /* Option < i32 > */
) RETURNS TABLE (
	"chunk_seq" INT,  /* i32 */
	"chunk" bytea  /* Vec < u8 > */
)
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'nvembed_chunks_utf8_wrapper';

-- Chunks: a long text cut into pieces that each fit the model's input, by the model's own
-- tokenizer (on the model server). A chunk is max_tokens long at most as the model sees it (the
-- instruction of `kind`, <s> and </s> included, so it is never truncated when embedded that way);
-- consecutive chunks share up to `overlap` tokens (at most half of a chunk's text); cuts fall on
-- a paragraph break where one is near, else a line break, a sentence end, a space. NULL
-- max_tokens / overlap take the defaults (SELECT * FROM nvembed_chunk_settings(NULL, NULL)).
-- Chunks are pieces of the text itself, trimmed of surrounding whitespace; a blank or NULL text
-- has none.
CREATE FUNCTION nvembed_chunks(document text, max_tokens integer DEFAULT NULL, overlap integer DEFAULT NULL,
                               kind text DEFAULT 'passage')
RETURNS TABLE (chunk_seq integer, chunk text)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT c.chunk_seq, pg_catalog.convert_from(c.chunk, 'UTF8')
    FROM @extschema@.nvembed_chunks_utf8(
        pg_catalog.convert_to(document, 'UTF8'), kind,
        pg_catalog.convert_to(CASE kind WHEN 'passage' THEN '' WHEN 'query' THEN pg_catalog.current_setting('nvembed.query_instruction') END,
                              'UTF8'),
        max_tokens, overlap) AS c;
END;

-- Vectorizers: asynchronous embedding of a table's column.
--
-- nvembed_create_vectorizer(tbl, source_column, target_column [, kind]) installs statement-level
-- AFTER INSERT / AFTER UPDATE triggers that only write queue entries (one per row, keyed by the
-- table's primary key), so an INSERT or a COPY never waits for the model. The vectorizer
-- workers (one per database in nvembed.vectorizer_databases, started by the supervisor) drain
-- the queue:
--   1. claim: a short transaction takes up to nvembed.vectorizer_batch_rows due entries
--      FOR UPDATE SKIP LOCKED and marks them with the worker's pid; the worker reads the rows'
--      texts as the vectorizer's owner (nvembed_vectorizer_read) and commits before the model
--      call. The call takes seconds per text
--      with the real model (hours for a 32k-token one): no transaction, snapshot or row lock is
--      held meanwhile, so neither VACUUM nor the application's writes wait for it.
--   2. the worker embeds the texts through the model server as bulk work;
--   3. write and settle: one transaction writes each vector as the owner
--      (nvembed_vectorizer_write), only where the row, locked, still has byte-for-byte the text
--      that was embedded, then settles the entries (nvembed_vectorizer_settle): written or gone
--      ones are removed; a row whose text changed stays queued (the change's own enqueue may have
--      found it queued already); a row another session holds locked is released for later.
-- A claim whose worker is gone (crash, restart) is released by the next claim: claims carry the
-- worker's pid, and a worker releases its own pid's claims when it starts (a pid may be reused).
-- A chunk vectorizer (nvembed_create_chunk_vectorizer) fills a chunk table instead of a column:
-- the same queue, triggers and claims; the worker first has the model server cut each text into
-- chunks (sql/chunks.sql), embeds the chunks, and its write replaces every chunk of the row in
-- the transaction that checks the row's text (nvembed_vectorizer_write_chunks). The chunk table's
-- foreign key to the table (ON DELETE / ON UPDATE CASCADE) takes a deleted row's chunks with it
-- and follows a changed key.
-- Texts that fail are retried with exponential backoff and, after
-- nvembed.vectorizer_max_attempts, move to nvembed_vectorizer_failures, out of the way of the
-- rest of the queue; nvembed_vectorizer_retry() puts them back.
--
-- Privileges: the vectorizer records the role that created it; the worker reads and writes the
-- table as that role (the user id switched as SECURITY DEFINER does it, so no code it runs can
-- switch back), and runs no code of the table's as anything else. The bookkeeping tables are
-- open to every role through row-level security policies that admit a row only for a role that
-- may update the vectorized column; the enqueue trigger is SECURITY DEFINER (anyone who may
-- write the table may enqueue its rows) and evaluates nothing of the row but NULL tests, byte
-- comparisons and the key columns' output functions.

CREATE TABLE nvembed_vectorizer (
    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    tbl regclass NOT NULL,
    source_column name NOT NULL,
    -- NULL for a chunk vectorizer.
    target_column name,
    -- A chunk vectorizer's table (its rows: the key, chunk_seq, chunk, embedding), the longest
    -- model input a chunk makes and the tokens neighbours share; NULL for a column vectorizer.
    chunk_table regclass UNIQUE,
    chunk_tokens integer CHECK (chunk_tokens > 0),
    chunk_overlap integer CHECK (chunk_overlap >= 0),
    kind text NOT NULL CHECK (kind IN ('passage', 'query')),
    -- Fixed when the vectorizer is created: a session's nvembed.query_instruction must not
    -- change the vectors of rows embedded later.
    instruction text NOT NULL,
    -- The session's nvembed.max_length when the vectorizer was created, for the same reason.
    max_length integer NOT NULL CHECK (max_length > 0),
    owner regrole NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- The primary key's columns when the vectorizer was created, in key order.
    key_columns name[] NOT NULL CHECK (cardinality(key_columns) > 0),
    embedded bigint NOT NULL DEFAULT 0,
    -- The last problem that was nobody's text's fault (model server unreachable, model not
    -- loadable), shown by the status view until a batch succeeds.
    last_error text,
    last_error_at timestamptz,
    UNIQUE (tbl, target_column),
    CHECK ((target_column IS NULL) = (chunk_table IS NOT NULL)
           AND (chunk_table IS NULL) = (chunk_tokens IS NULL) AND (chunk_table IS NULL) = (chunk_overlap IS NULL))
);

-- Enqueueing must cost little next to the write that enqueues (a COPY of many rows): no
-- foreign key (a lookup per row) and no unique key (a speculative insertion per row, several
-- times the cost of the row itself). A row may so have several entries; a claim takes all
-- entries of the keys it claims, and embeds each key once.
CREATE TABLE nvembed_vectorizer_queue (
    vectorizer_id integer NOT NULL,
    -- The primary key's values as text, in the key's column order, as a text[] literal (exact:
    -- each type's own output and input functions; compared byte-for-byte).
    row_key text COLLATE "C" NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    last_error text,
    last_attempt_at timestamptz,
    -- pid of the worker that claimed the entry; NULL while waiting.
    claimed_by integer
);
CREATE INDEX nvembed_vectorizer_queue_key ON nvembed_vectorizer_queue (vectorizer_id, row_key);
CREATE INDEX nvembed_vectorizer_queue_claimed ON nvembed_vectorizer_queue (claimed_by) WHERE claimed_by IS NOT NULL;

CREATE TABLE nvembed_vectorizer_failure (
    vectorizer_id integer NOT NULL,
    row_key text COLLATE "C" NOT NULL,
    attempts integer NOT NULL,
    last_error text NOT NULL,
    last_attempt_at timestamptz NOT NULL,
    PRIMARY KEY (vectorizer_id, row_key)
);

-- One row per completed batch of the last minute, for rows_per_second.
CREATE TABLE nvembed_vectorizer_batch (
    vectorizer_id integer NOT NULL,
    finished_at timestamptz NOT NULL,
    rows_embedded integer NOT NULL
);

-- pg_dump keeps the vectorizers and their queues (tables created by an extension are
-- otherwise left out of a dump).
SELECT pg_catalog.pg_extension_config_dump('@extschema@.nvembed_vectorizer', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.nvembed_vectorizer_queue', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.nvembed_vectorizer_failure', '');
-- Restored vectorizers keep their ids, so the next one must not be given one of them.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.nvembed_vectorizer_id_seq', '');

-- The primary key of `tbl`, one row per column in key order: the column, its type and the
-- equality operator of the key's index (both schema-qualified: the caller's search_path plays no
-- part, and the comparison is the one the index answers; the writes run under a session's
-- search_path, where an unqualified `text` could be another schema's type).
CREATE FUNCTION nvembed_vectorizer_key(tbl regclass)
RETURNS TABLE (key_position bigint, column_name name, type_name text, equals text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.key_position, a.attname, format('%I.%I', tn.nspname, t.typname),
           format('OPERATOR(%I.%s)', n.nspname, o.oprname)
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indclass::oid[]) WITH ORDINALITY AS k(attnum, opclass, key_position)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    JOIN pg_type t ON t.oid = a.atttypid
    JOIN pg_namespace tn ON tn.oid = t.typnamespace
    JOIN pg_opclass c ON c.oid = k.opclass
    JOIN pg_amop ao ON ao.amopfamily = c.opcfamily AND ao.amoplefttype = c.opcintype
                   AND ao.amoprighttype = c.opcintype AND ao.amopstrategy = 3 AND ao.amopmethod = 403
    JOIN pg_operator o ON o.oid = ao.amopopr
    JOIN pg_namespace n ON n.oid = o.oprnamespace
    WHERE i.indrelid = $1 AND i.indisprimary
    ORDER BY k.key_position
$$;

-- The key columns of chunk table `chunk_table` of `tbl`, with the table's own in its key order:
-- paired through the chunk table's foreign key to the table (the one whose columns are the
-- table's primary key), so a column renamed on either side stays paired.
CREATE FUNCTION nvembed_vectorizer_chunk_key(chunk_table regclass, tbl regclass)
RETURNS TABLE (key_position bigint, column_name name, chunk_column name, type_name text, equals text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH k AS (SELECT * FROM @extschema@.nvembed_vectorizer_key(tbl)),
         fk AS (SELECT f.conkey, f.confkey FROM pg_constraint f
                WHERE f.conrelid = chunk_table AND f.confrelid = tbl AND f.contype = 'f'
                  AND (SELECT array_agg(a.attname ORDER BY a.attname) FROM unnest(f.confkey) AS u(attnum)
                       JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = u.attnum)
                      = (SELECT array_agg(k.column_name ORDER BY k.column_name) FROM k)
                ORDER BY f.oid LIMIT 1)
    SELECT k.key_position, k.column_name, ca.attname, k.type_name, k.equals
    FROM fk CROSS JOIN LATERAL unnest(fk.conkey, fk.confkey) AS m(chunk_attnum, table_attnum)
    JOIN pg_attribute ta ON ta.attrelid = tbl AND ta.attnum = m.table_attnum
    JOIN k ON k.column_name = ta.attname
    JOIN pg_attribute ca ON ca.attrelid = chunk_table AND ca.attnum = m.chunk_attnum
    ORDER BY k.key_position
$$;

-- Whether the current role may manage vectorizer `id`: it may update the vectorized column, or
-- insert into and delete from the chunk table.
-- (A single expression, without SET: the row-level security policies below inline it.)
CREATE FUNCTION nvembed_vectorizer_managed(id integer) RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer v
               WHERE v.id OPERATOR(pg_catalog.=) $1
                 AND CASE WHEN v.chunk_table IS NULL THEN pg_catalog.has_column_privilege(v.tbl, v.target_column, 'UPDATE')
                          ELSE pg_catalog.has_table_privilege(v.chunk_table, 'INSERT')
                               AND pg_catalog.has_table_privilege(v.chunk_table, 'DELETE') END);

ALTER TABLE nvembed_vectorizer ENABLE ROW LEVEL SECURITY;
ALTER TABLE nvembed_vectorizer_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE nvembed_vectorizer_failure ENABLE ROW LEVEL SECURITY;
-- A role sees the vectorizers of tables it may read (their names, columns and owners are no
-- business of roles that may not).
CREATE POLICY read ON nvembed_vectorizer FOR SELECT USING (pg_catalog.has_any_column_privilege(tbl, 'SELECT'));
CREATE POLICY create_own ON nvembed_vectorizer FOR INSERT
    WITH CHECK (owner OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
                AND pg_catalog.has_table_privilege(tbl, 'TRIGGER')
                AND key_columns OPERATOR(pg_catalog.=) ARRAY(SELECT k.column_name FROM @extschema@.nvembed_vectorizer_key(tbl) k
                                                            ORDER BY k.key_position)
                AND embedded OPERATOR(pg_catalog.=) 0 AND last_error IS NULL
                -- A chunk table is the creating role's own, with its foreign key to the table.
                AND (chunk_table IS NULL
                     OR (pg_catalog.pg_has_role((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) chunk_table), 'USAGE')
                         AND EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_chunk_key(chunk_table, tbl)))));
CREATE POLICY drop_managed ON nvembed_vectorizer FOR DELETE USING (@extschema@.nvembed_vectorizer_managed(id));
CREATE POLICY managed ON nvembed_vectorizer_queue FOR SELECT USING (@extschema@.nvembed_vectorizer_managed(vectorizer_id));
CREATE POLICY drop_managed ON nvembed_vectorizer_queue FOR DELETE USING (@extschema@.nvembed_vectorizer_managed(vectorizer_id));
-- Only keys as the triggers write them: one text per key column of the vectorizer, spelled as
-- text[] spells them. (Only these two columns may be given: INSERT is granted on them alone.)
CREATE POLICY enqueue_managed ON nvembed_vectorizer_queue FOR INSERT
    WITH CHECK (@extschema@.nvembed_vectorizer_managed(vectorizer_id)
                AND (row_key::text[])::text OPERATOR(pg_catalog.=) row_key
                AND pg_catalog.array_ndims(row_key::text[]) OPERATOR(pg_catalog.=) 1
                AND pg_catalog.array_lower(row_key::text[], 1) OPERATOR(pg_catalog.=) 1
                AND pg_catalog.cardinality(row_key::text[]) OPERATOR(pg_catalog.=)
                    (SELECT pg_catalog.cardinality(v.key_columns) FROM @extschema@.nvembed_vectorizer v
                     WHERE v.id OPERATOR(pg_catalog.=) vectorizer_id));
CREATE POLICY managed ON nvembed_vectorizer_failure FOR SELECT USING (@extschema@.nvembed_vectorizer_managed(vectorizer_id));
CREATE POLICY drop_managed ON nvembed_vectorizer_failure FOR DELETE USING (@extschema@.nvembed_vectorizer_managed(vectorizer_id));
GRANT SELECT, INSERT, DELETE ON nvembed_vectorizer TO PUBLIC;
GRANT SELECT, DELETE ON nvembed_vectorizer_queue TO PUBLIC;
GRANT INSERT (vectorizer_id, row_key) ON nvembed_vectorizer_queue TO PUBLIC;
GRANT SELECT, DELETE ON nvembed_vectorizer_failure TO PUBLIC;

-- The key of row `alias` as the text of a text[] (the queue's row_key), from the key columns'
-- output functions only (format's %s): no cast a role may have defined runs here.
-- (A loop, not a query: the enqueue trigger calls it for every statement.)
CREATE FUNCTION nvembed_vectorizer_key_text(key_columns name[], alias text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    column_name name;
    values_list text;
BEGIN
    FOREACH column_name IN ARRAY key_columns LOOP
        values_list := concat_ws(', ', values_list, format('pg_catalog.format(''%%s'', %s.%I)', alias, column_name));
    END LOOP;
    RETURN format('(ARRAY[%s]::pg_catalog.text[])::pg_catalog.text', values_list);
END;
$$;

-- The statement that queues the rows of `relation` that have a text and no vector (for a chunk
-- vectorizer, whose `target_column` is NULL: that have a text): the enqueue trigger's for
-- inserted rows, and nvembed_create_vectorizer's for existing ones.
CREATE FUNCTION nvembed_vectorizer_queue_rows(key_columns name[], source_column name, target_column name, relation text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
RETURN format('INSERT INTO @extschema@.nvembed_vectorizer_queue (vectorizer_id, row_key)
               SELECT $1, %s FROM %s n WHERE %s n.%I IS NOT NULL',
              @extschema@.nvembed_vectorizer_key_text(key_columns, 'n'), relation,
              CASE WHEN target_column IS NOT NULL THEN format('n.%I IS NULL AND', target_column) ELSE '' END, source_column);

-- "row `alias` of `tbl` has the key in text[] expression `key`", usable by the key's index.
-- The vectorizer's key columns must still be the primary key.
CREATE FUNCTION nvembed_vectorizer_key_matches(tbl regclass, key_columns name[], alias text, key text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    matches text;
BEGIN
    SELECT string_agg(format('%s.%I %s (%s)[%s]::%s', alias, k.column_name, k.equals, key, k.key_position, k.type_name),
                      ' AND ' ORDER BY k.key_position)
    INTO matches
    FROM @extschema@.nvembed_vectorizer_key(tbl) k
    HAVING array_agg(k.column_name ORDER BY k.key_position) = key_columns;
    IF matches IS NULL THEN
        RAISE EXCEPTION 'the primary key of % is not (%) any more', tbl, array_to_string(key_columns, ', ')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Drop the vectorizer and create it again.';
    END IF;
    RETURN matches;
END;
$$;

-- The enqueue triggers queue a row when it needs a vector:
--   INSERT  the target is NULL and the source is not (a COPY of precomputed vectors queues
--           nothing); for a chunk vectorizer, the source is not NULL;
--   UPDATE  the source changed (byte-for-byte), unless the same statement also set the target
--           to another non-NULL vector; or the target is NULL and the source is not. For a
--           chunk vectorizer: the source changed (to NULL too: its chunks are removed).
-- A row that has an entry waiting already gets no other (but a chunk vectorizer's does, see
-- nvembed_vectorizer_enqueue_row); one whose entry a worker has claimed gets a new one,
-- whatever becomes of the claimed one. The triggers of vectorizer N:
--   nvembed_vectorizer_N_insert  AFTER INSERT FOR EACH STATEMENT with a transition table, on the
--           table and on each partition (statement triggers fire only for statements naming
--           their table): one INSERT ... SELECT per statement, so a COPY of many rows costs one
--           queue write, not one call per row;
--   nvembed_vectorizer_N_update  AFTER UPDATE FOR EACH ROW, its WHEN clause the rule above (a
--           row that needs nothing costs no call): only a row trigger pairs each row with its
--           own old version (a statement that changes keys cannot be paired by key: a row moved
--           onto a key another row held would be compared with that other row). Fires ALWAYS,
--           so also in logical replication's apply worker. On the table only; PostgreSQL
--           clones it to every partition;
--   nvembed_vectorizer_N_rekey   AFTER UPDATE FOR EACH ROW WHEN the key changed: a row that needs
--           nothing by the rule above is queued under its new key if its old key has an entry
--           (its pending work would look for it at the old key). ALWAYS, cloned like _update;
--   nvembed_vectorizer_N_moved   AFTER UPDATE FOR EACH STATEMENT, on a partitioned table and
--           its partitioned partitions: a row moved to another partition fires no row UPDATE
--           trigger (it is deleted and inserted), and its key changed with it (a primary key
--           includes the partition key). Every new row whose key no old row had is queued, and
--           every one whose text differs from the old row's with its key (rows that swapped
--           partitions; on a partitioned table an UPDATE that sets both the text and the vector
--           is so embedded again);
--   nvembed_vectorizer_N_replica_insert  AFTER INSERT FOR EACH ROW, fired only in replica mode
--           (session_replication_role = replica: the apply worker of a subscription), where
--           statement triggers never fire. On the table only, cloned to the partitions.

-- Whether table `rel` has a column named `column_name`.
CREATE FUNCTION nvembed_vectorizer_has_column(rel oid, column_name name) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
               WHERE a.attrelid OPERATOR(pg_catalog.=) rel AND a.attname OPERATOR(pg_catalog.=) column_name
                 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped);

-- Whether the triggers of vectorizer `v`, firing on relation `rel`, are to queue its rows: `rel`
-- is the vectorized table or one of its partitions (not one detached since, nor another table a
-- trigger was made for by hand: the triggers are SECURITY DEFINER), and every column the
-- vectorizer names is still there (a rename that was not followed must never make the table
-- unwritable; the status view reports it).
CREATE FUNCTION nvembed_vectorizer_applies(v @extschema@.nvembed_vectorizer, rel oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (v.tbl = rel OR v.tbl IN (SELECT a.relid FROM pg_partition_ancestors(rel) AS a(relid)))
       AND NOT EXISTS (SELECT 1 FROM unnest(array_remove(v.key_columns || ARRAY[v.source_column, v.target_column], NULL)) AS c(name)
                       WHERE NOT @extschema@.nvembed_vectorizer_has_column(rel, c.name))
$$;

-- The statement triggers: INSERT queues the inserted rows that need a vector; UPDATE (on a
-- partitioned table) the rows moved between partitions (see _moved above).
CREATE FUNCTION nvembed_vectorizer_enqueue() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- Keys are written and read as text: the same settings everywhere (a writer's DateStyle must not
-- change what a date key reads back as).
SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
BEGIN
    SELECT * INTO v FROM @extschema@.nvembed_vectorizer WHERE id = TG_ARGV[0]::integer;
    -- Not found: dropped by a concurrent nvembed_drop_vectorizer.
    IF NOT FOUND OR NOT @extschema@.nvembed_vectorizer_applies(v, TG_RELID) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        EXECUTE @extschema@.nvembed_vectorizer_queue_rows(v.key_columns, v.source_column, v.target_column, 'nvembed_new_rows')
            USING v.id;
    ELSE
        EXECUTE format(
            'INSERT INTO @extschema@.nvembed_vectorizer_queue (vectorizer_id, row_key)
             SELECT DISTINCT $1, n.nvembed_key
             FROM (SELECT %1$s AS nvembed_key, n.* FROM nvembed_new_rows n) n
             WHERE NOT EXISTS (SELECT 1 FROM (SELECT %2$s AS nvembed_key, o.* FROM nvembed_old_rows o) o
                               WHERE o.nvembed_key = n.nvembed_key AND ROW(o.%3$I)::record *= ROW(n.%3$I)::record)
               AND ($2 OR NOT EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_queue q
                                      WHERE q.vectorizer_id = $1 AND q.row_key = n.nvembed_key AND q.claimed_by IS NULL))',
            @extschema@.nvembed_vectorizer_key_text(v.key_columns, 'n'), @extschema@.nvembed_vectorizer_key_text(v.key_columns, 'o'),
            v.source_column)
            USING v.id, v.chunk_table IS NOT NULL;
    END IF;
    RETURN NULL;
END;
$$;

-- The row triggers: queue row NEW (their WHEN clause has decided that it needs a vector).
CREATE FUNCTION nvembed_vectorizer_enqueue_row() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- The key settings of nvembed_vectorizer_enqueue.
SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    old_key text;
    new_key text;
BEGIN
    SELECT * INTO v FROM @extschema@.nvembed_vectorizer WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND OR NOT @extschema@.nvembed_vectorizer_applies(v, TG_RELID) THEN
        RETURN NULL;
    END IF;
    -- A row whose key changed and needs nothing by the rule above may still have work pending
    -- under its old key (a text changed just before, not embedded yet): that entry would find
    -- another row or none at its key, so the row is queued under its new one.
    IF TG_NARGS > 1 AND TG_ARGV[1] = 'rekey' THEN
        EXECUTE 'SELECT ' || @extschema@.nvembed_vectorizer_key_text(v.key_columns, '($1)') INTO old_key USING OLD;
        IF NOT EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_queue q WHERE q.vectorizer_id = v.id AND q.row_key = old_key) THEN
            RETURN NULL;
        END IF;
    END IF;
    EXECUTE 'SELECT ' || @extschema@.nvembed_vectorizer_key_text(v.key_columns, '($1)') INTO new_key USING NEW;
    -- A chunk vectorizer's row is queued even when it has an entry waiting: its worker takes no
    -- lock on the row, so a claim made while this transaction is open reads the old text, and
    -- settling it would remove the only entry this change has.
    INSERT INTO @extschema@.nvembed_vectorizer_queue (vectorizer_id, row_key)
    SELECT v.id, new_key
    WHERE v.chunk_table IS NOT NULL
       OR NOT EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_queue q
                      WHERE q.vectorizer_id = v.id AND q.row_key = new_key AND q.claimed_by IS NULL);
    RETURN NULL;
END;
$$;

-- The triggers of vectorizer `id` on `rel`: the vectorized table itself, or one of its
-- partitions (which get the statement triggers only; the row triggers are cloned to them).
CREATE FUNCTION nvembed_vectorizer_create_triggers(id integer, rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    -- The update rule above, on OLD and NEW (byte-for-byte image comparison: no equality
    -- operator of the column types needed, and "changed" means any change).
    needs_vector text;
BEGIN
    SELECT * INTO STRICT v FROM @extschema@.nvembed_vectorizer x WHERE x.id = $1;
    -- Made already: creating the table's triggers (their ALTER TABLE ... ENABLE) runs the event
    -- trigger below, which gives the partitions theirs.
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = rel AND t.tgname = format('nvembed_vectorizer_%s_insert', id)) THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS nvembed_new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@.nvembed_vectorizer_enqueue(%s)',
                   format('nvembed_vectorizer_%s_insert', id), rel, id);
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = rel) = 'p' THEN
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS nvembed_old_rows NEW TABLE AS nvembed_new_rows
                        FOR EACH STATEMENT EXECUTE FUNCTION @extschema@.nvembed_vectorizer_enqueue(%s)',
                       format('nvembed_vectorizer_%s_moved', id), rel, id);
    END IF;
    IF rel = v.tbl THEN
        -- (The operator's function by name: ROW(a) *= ROW(b) parses as a comparison of the
        -- values themselves, and pg_dump prints ROW(a)::record as (a).)
        needs_vector := CASE WHEN v.chunk_table IS NOT NULL
            THEN format('NOT pg_catalog.record_image_eq(ROW(NEW.%1$I), ROW(OLD.%1$I))', v.source_column)
            ELSE format(
                '(NEW.%1$I IS NULL AND NEW.%2$I IS NOT NULL)
                 OR (NOT pg_catalog.record_image_eq(ROW(NEW.%2$I), ROW(OLD.%2$I))
                     AND (NEW.%1$I IS NULL OR pg_catalog.record_image_eq(ROW(NEW.%1$I), ROW(OLD.%1$I))))',
                v.target_column, v.source_column) END;
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s FOR EACH ROW WHEN (%s)
                        EXECUTE FUNCTION @extschema@.nvembed_vectorizer_enqueue_row(%s)',
                       format('nvembed_vectorizer_%s_update', id), rel, needs_vector, id);
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s FOR EACH ROW WHEN (NOT pg_catalog.record_image_eq(ROW(%s), ROW(%s)))
                        EXECUTE FUNCTION @extschema@.nvembed_vectorizer_enqueue_row(%s, ''rekey'')',
                       format('nvembed_vectorizer_%s_rekey', id), rel,
                       (SELECT string_agg(format('NEW.%I', k), ', ') FROM unnest(v.key_columns) AS k),
                       (SELECT string_agg(format('OLD.%I', k), ', ') FROM unnest(v.key_columns) AS k), id);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s FOR EACH ROW WHEN (%s NEW.%I IS NOT NULL)
                        EXECUTE FUNCTION @extschema@.nvembed_vectorizer_enqueue_row(%s)',
                       format('nvembed_vectorizer_%s_replica_insert', id), rel,
                       CASE WHEN v.target_column IS NOT NULL THEN format('NEW.%I IS NULL AND', v.target_column) ELSE '' END,
                       v.source_column, id);
        PERFORM @extschema@.nvembed_vectorizer_set_firing(id);
    END IF;
END;
$$;

-- When the row triggers of vectorizer `id` fire: the update and rekey triggers ALWAYS, the
-- replica insert trigger only in replica mode, on the table and on every partition. (SECURITY
-- DEFINER: only the table's owner may change when a trigger fires, and a role with TRIGGER
-- privilege may create a vectorizer. It changes nothing but the firing of a vectorizer's row
-- triggers.)
CREATE FUNCTION nvembed_vectorizer_set_firing(id integer) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT g.tgrelid::regclass AS rel, g.tgname, CASE WHEN g.tgname LIKE '%\_replica\_insert' THEN 'REPLICA' ELSE 'ALWAYS' END AS firing
        FROM @extschema@.nvembed_vectorizer v
        JOIN pg_trigger g ON g.tgrelid IN (SELECT p.relid FROM pg_partition_tree(v.tbl) p UNION SELECT v.tbl)
        WHERE v.id = $1
          AND g.tgname IN (format('nvembed_vectorizer_%s_update', v.id), format('nvembed_vectorizer_%s_rekey', v.id),
                           format('nvembed_vectorizer_%s_replica_insert', v.id))
          AND g.tgfoid = '@extschema@.nvembed_vectorizer_enqueue_row()'::regprocedure
          -- Only triggers still as CREATE TRIGGER made them: any role may call this, and it
          -- must neither lock a table whose triggers are set already nor re-enable a trigger
          -- the table's owner disabled.
          AND g.tgenabled = 'O'
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE %s TRIGGER %I', t.rel, t.firing, t.tgname);
    END LOOP;
END;
$$;

-- Refuses a table that no vectorizer can keep in step, and a source column that is not there
-- or that the calling role (who becomes the vectorizer's owner) may not read with the key.
CREATE FUNCTION nvembed_vectorizer_check_source(tbl regclass, source_column text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    relkind "char";
BEGIN
    SELECT c.relkind INTO relkind FROM pg_class c WHERE c.oid = tbl;
    IF relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = 'wrong_object_type',
            HINT = 'A vectorizer fills a column of a table or of a partitioned table.';
    END IF;
    IF (SELECT c.relispartition FROM pg_class c WHERE c.oid = tbl) THEN
        RAISE EXCEPTION '% is a partition of %', tbl, pg_partition_root(tbl) USING ERRCODE = 'wrong_object_type',
            HINT = format('Create the vectorizer on the partitioned table %s: it covers every partition, and the rows written through it.',
                          pg_partition_root(tbl));
    END IF;
    IF EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = tbl AND NOT c.relispartition) THEN
        RAISE EXCEPTION '% has inheritance children', tbl USING ERRCODE = 'wrong_object_type',
            HINT = 'A vectorizer fills the rows of one table: create one on each table of the hierarchy, or partition the table (a vectorizer on a partitioned table covers every partition).';
    END IF;
    IF NOT @extschema@.nvembed_vectorizer_has_column(tbl, source_column) THEN
        RAISE EXCEPTION 'column % of relation % does not exist', quote_ident(source_column), tbl USING ERRCODE = 'undefined_column';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_key(tbl)) THEN
        RAISE EXCEPTION 'table % has no primary key', tbl USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = format('A vectorizer finds rows again by their primary key: ALTER TABLE %s ADD PRIMARY KEY (...).', tbl);
    END IF;
    IF NOT has_column_privilege(tbl, source_column, 'SELECT')
       OR EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_key(tbl) k WHERE NOT has_column_privilege(tbl, k.column_name, 'SELECT')) THEN
        RAISE EXCEPTION 'permission denied to embed % of %', quote_ident(source_column), tbl
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'The vectorizer reads as the role that creates it: it needs SELECT on the source and key columns.';
    END IF;
END;
$$;

-- The instruction a vectorizer of `kind` embeds with (fixed when it is created: a session's
-- nvembed.query_instruction must not change the vectors of rows embedded later).
CREATE FUNCTION nvembed_vectorizer_instruction(caller text, kind text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF kind IS NULL OR kind NOT IN ('passage', 'query') THEN
        RAISE EXCEPTION '%: kind must be ''passage'' or ''query'', not %', caller, quote_nullable(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN CASE kind WHEN 'query' THEN current_setting('nvembed.query_instruction') ELSE '' END;
END;
$$;

-- Queues the rows of `rel` (the vectorized table, or a partition of it that holds rows) that
-- need embedding by vectorizer `id`.
CREATE FUNCTION nvembed_vectorizer_queue_existing(id integer, rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- The key settings of nvembed_vectorizer_enqueue.
SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
BEGIN
    SELECT * INTO STRICT v FROM @extschema@.nvembed_vectorizer x WHERE x.id = $1;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = rel) = 'r' OR rel = v.tbl THEN
        EXECUTE @extschema@.nvembed_vectorizer_queue_rows(v.key_columns, v.source_column, v.target_column, rel::text) USING v.id;
    END IF;
END;
$$;

-- Makes the triggers of new vectorizer `id` on `tbl` and its partitions and queues the rows
-- that need embedding.
CREATE FUNCTION nvembed_vectorizer_start(id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    part regclass;
BEGIN
    SELECT * INTO STRICT v FROM @extschema@.nvembed_vectorizer x WHERE x.id = $1;
    -- Statement triggers of a partitioned table fire only for statements naming it: each
    -- partition gets its own, for statements that write to it directly.
    FOR part IN SELECT v.tbl UNION SELECT relid FROM pg_partition_tree(v.tbl) LOOP
        PERFORM @extschema@.nvembed_vectorizer_create_triggers(v.id, part);
    END LOOP;
    PERFORM @extschema@.nvembed_vectorizer_queue_existing(v.id, v.tbl);
END;
$$;

-- Creates a vectorizer: `target_column` of `tbl` will hold the embedding of `source_column`
-- ('passage', or 'query' with the session's nvembed.query_instruction), kept up to date by the
-- vectorizer workers. Queues every row that has a text and no vector. Returns the id.
CREATE FUNCTION nvembed_create_vectorizer(tbl regclass, source_column text, target_column text,
                                          kind text DEFAULT 'passage') RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_type regtype;
    target_type_name name;
    dimension integer;
    model_dimension integer;
    instruction text := @extschema@.nvembed_vectorizer_instruction('nvembed_create_vectorizer', kind);
    id integer;
BEGIN
    PERFORM @extschema@.nvembed_vectorizer_check_source(tbl, source_column);
    IF NOT @extschema@.nvembed_vectorizer_has_column(tbl, target_column) THEN
        RAISE EXCEPTION 'column % of relation % does not exist', quote_ident(target_column), tbl USING ERRCODE = 'undefined_column';
    END IF;
    SELECT a.atttypid, t.typname, a.atttypmod INTO target_type, target_type_name, dimension
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = tbl AND a.attname = target_column;
    IF target_type = 'real[]'::regtype THEN
        dimension := NULL;
    ELSIF target_type_name IN ('vector', 'halfvec')
          AND EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                      WHERE d.classid = 'pg_type'::regclass AND d.objid = target_type AND e.extname = 'vector') THEN
        dimension := nullif(dimension, -1);
    ELSE
        RAISE EXCEPTION 'column % of % has type %, not vector(n), halfvec(n) or real[]', quote_ident(target_column), tbl, target_type
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE vector(n), with n the model''s dimension.', tbl, target_column);
    END IF;
    model_dimension := @extschema@.nvembed_model_dimension();
    IF dimension IS DISTINCT FROM model_dimension AND dimension IS NOT NULL AND model_dimension IS NOT NULL THEN
        RAISE EXCEPTION 'column % of % has % dimensions, but the model''s vectors have %', quote_ident(target_column), tbl, dimension, model_dimension
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE %s(%s).', tbl, target_column, target_type_name, model_dimension);
    END IF;
    -- Refused now rather than failing in the worker, batch after batch.
    IF NOT has_column_privilege(tbl, target_column, 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied to embed % of % into %', quote_ident(source_column), tbl, quote_ident(target_column)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'The vectorizer writes as the role that creates it: it needs UPDATE on the target column.';
    END IF;
    IF EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer v WHERE v.tbl = $1 AND v.target_column = $3) THEN
        RAISE EXCEPTION 'a vectorizer already fills column % of %', quote_ident(target_column), tbl
            USING ERRCODE = 'duplicate_object', HINT = 'Drop it first with nvembed_drop_vectorizer.';
    END IF;
    INSERT INTO @extschema@.nvembed_vectorizer AS v (tbl, source_column, target_column, key_columns, kind, instruction,
                                                     max_length, owner)
    VALUES ($1, $2, $3, ARRAY(SELECT k.column_name FROM @extschema@.nvembed_vectorizer_key(tbl) k ORDER BY k.key_position),
            $4, instruction, current_setting('nvembed.max_length')::integer,
            (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user)::regrole)
    RETURNING v.id INTO id;
    PERFORM @extschema@.nvembed_vectorizer_start(id);
    RETURN id;
END;
$$;

-- Creates a chunk vectorizer: table `chunk_table` (created here; in the schema of `tbl` unless
-- the name is qualified) will hold the chunks of `source_column` of every row of `tbl`, at most
-- `max_tokens` long with `overlap` tokens shared by neighbours (NULL: the defaults of
-- nvembed_chunk_settings), each with its embedding as a `kind` text, kept in step by the
-- vectorizer workers: a row's chunks are replaced whenever its text changes, go with the row
-- (ON DELETE CASCADE) and follow its key (ON UPDATE CASCADE). The chunk table's columns are the
-- primary key of `tbl`, chunk_seq (from 1), chunk and embedding (vector(n) with pgvector, else
-- real[]). Asks the model server to check the budget (its tokenizer counts the instruction) and
-- the dimension: the model is loaded if it was not. Queues every row that has a text. Returns
-- the chunk table.
CREATE FUNCTION nvembed_create_chunk_vectorizer(tbl regclass, source_column text, chunk_table text,
                                                max_tokens integer DEFAULT NULL, overlap integer DEFAULT NULL,
                                                kind text DEFAULT 'passage') RETURNS regclass
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    instruction text := @extschema@.nvembed_vectorizer_instruction('nvembed_create_chunk_vectorizer', kind);
    settings record;
    name_parts text[];
    chunk_schema name;
    chunk_name name;
    clash name;
    key_definitions text;
    key_list text;
    embedding_type text;
    dimension integer;
    chunks regclass;
    id integer;
BEGIN
    PERFORM @extschema@.nvembed_vectorizer_check_source(tbl, source_column);
    SELECT * INTO settings FROM @extschema@.nvembed_chunk_settings(max_tokens, overlap);
    BEGIN
        name_parts := parse_ident(chunk_table);
    EXCEPTION WHEN invalid_parameter_value THEN
        name_parts := NULL;
    END;
    IF name_parts IS NULL OR cardinality(name_parts) NOT IN (1, 2) THEN
        RAISE EXCEPTION 'improper chunk table name: %', quote_nullable(chunk_table) USING ERRCODE = 'invalid_name',
            HINT = 'Name it as table or schema.table.';
    END IF;
    chunk_schema := CASE WHEN cardinality(name_parts) = 2 THEN name_parts[1]
                         ELSE (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl) END;
    chunk_name := name_parts[cardinality(name_parts)];
    IF chunk_schema = 'pg_temp' OR chunk_schema LIKE 'pg\_temp\_%' OR chunk_schema LIKE 'pg\_toast\_temp\_%' THEN
        RAISE EXCEPTION 'a chunk table cannot be temporary' USING ERRCODE = 'feature_not_supported',
            HINT = 'The vectorizer workers write chunk tables from their own sessions: a chunk vectorizer needs a permanent table and a permanent chunk table.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = chunk_schema) THEN
        RAISE EXCEPTION 'schema % does not exist', quote_ident(chunk_schema) USING ERRCODE = 'invalid_schema_name';
    END IF;
    IF NOT has_schema_privilege(chunk_schema, 'CREATE') THEN
        RAISE EXCEPTION 'permission denied to create % in schema %', quote_ident(chunk_name), quote_ident(chunk_schema)
            USING ERRCODE = 'insufficient_privilege', HINT = 'Name a chunk table in a schema the role may create tables in.';
    END IF;
    IF EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_key(tbl) k WHERE NOT has_column_privilege(tbl, k.column_name, 'REFERENCES')) THEN
        RAISE EXCEPTION 'permission denied to reference the primary key of %', tbl USING ERRCODE = 'insufficient_privilege',
            HINT = format('The chunk table''s foreign key needs REFERENCES on the key: GRANT REFERENCES (%s) ON %s TO %I.',
                          (SELECT string_agg(quote_ident(k.column_name), ', ' ORDER BY k.key_position) FROM @extschema@.nvembed_vectorizer_key(tbl) k),
                          tbl, current_user);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = chunk_schema AND c.relname = chunk_name) THEN
        RAISE EXCEPTION 'relation %.% already exists', quote_ident(chunk_schema), quote_ident(chunk_name)
            USING ERRCODE = 'duplicate_table',
                  HINT = 'A chunk vectorizer creates its chunk table: name one that does not exist.';
    END IF;
    SELECT k.column_name INTO clash FROM @extschema@.nvembed_vectorizer_key(tbl) k
    WHERE k.column_name IN ('chunk_seq', 'chunk', 'embedding') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the primary key of % has a column named %, as the chunk table''s own', tbl, quote_ident(clash)
            USING ERRCODE = 'duplicate_column',
                  HINT = 'A chunk table has the key''s columns and chunk_seq, chunk and embedding: rename the key column.';
    END IF;
    IF (SELECT c.condeferrable FROM pg_constraint c WHERE c.conrelid = tbl AND c.contype = 'p') THEN
        RAISE EXCEPTION 'the primary key of % is deferrable', tbl USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'The chunk table''s foreign key (which takes a row''s chunks with it when the row goes) needs a primary key that is NOT DEFERRABLE.';
    END IF;
    -- The model server checks what the instruction leaves of max_tokens (and the overlap
    -- against it) with the model's tokenizer; the model's dimension is known from then on.
    PERFORM FROM @extschema@.nvembed_chunks('', settings.max_tokens, settings.overlap, kind);
    dimension := @extschema@.nvembed_model_dimension();
    SELECT format('%I.vector', n.nspname) || CASE WHEN dimension IS NOT NULL THEN format('(%s)', dimension) ELSE '' END INTO embedding_type
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector';
    SELECT string_agg(format('%I %s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                             CASE WHEN a.attcollation <> t.typcollation
                                  THEN format(' COLLATE %I.%I', cn.nspname, co.collname) ELSE '' END), ', ' ORDER BY k.key_position),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.key_position)
    INTO key_definitions, key_list
    FROM @extschema@.nvembed_vectorizer_key(tbl) k
    JOIN pg_attribute a ON a.attrelid = tbl AND a.attname = k.column_name
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_collation co ON co.oid = a.attcollation
    LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace;
    EXECUTE format('CREATE TABLE %I.%I (%s, chunk_seq integer NOT NULL CHECK (chunk_seq > 0), chunk text NOT NULL,
                                        embedding %s NOT NULL, PRIMARY KEY (%s, chunk_seq),
                                        FOREIGN KEY (%s) REFERENCES %s (%s) ON UPDATE CASCADE ON DELETE CASCADE)',
                   chunk_schema, chunk_name, key_definitions, coalesce(embedding_type, 'real[]'), key_list, key_list, tbl, key_list);
    chunks := format('%I.%I', chunk_schema, chunk_name)::regclass;
    INSERT INTO @extschema@.nvembed_vectorizer AS v (tbl, source_column, chunk_table, chunk_tokens, chunk_overlap, key_columns,
                                                     kind, instruction, max_length, owner)
    VALUES ($1, $2, chunks, settings.max_tokens, settings.overlap,
            ARRAY(SELECT k.column_name FROM @extschema@.nvembed_vectorizer_key(tbl) k ORDER BY k.key_position),
            kind, instruction, settings.max_tokens, (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user)::regrole)
    RETURNING v.id INTO id;
    EXECUTE format('COMMENT ON TABLE %s IS %L', chunks,
                   format('Chunks of %s.%s and their embeddings, kept in step by nvembed vectorizer %s.', tbl, quote_ident(source_column), id));
    PERFORM @extschema@.nvembed_vectorizer_start(id);
    RETURN chunks;
END;
$$;

-- Removes vectorizers `ids` with their queues and failures (their triggers are the caller's
-- business).
CREATE FUNCTION nvembed_vectorizer_forget(ids integer[]) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    DELETE FROM @extschema@.nvembed_vectorizer_queue q WHERE q.vectorizer_id = ANY (ids);
    DELETE FROM @extschema@.nvembed_vectorizer_failure f WHERE f.vectorizer_id = ANY (ids);
    DELETE FROM @extschema@.nvembed_vectorizer v WHERE v.id = ANY (ids);
END;

-- Drops the triggers of vectorizer `id` on `tbl` and its partitions (the clones of its row
-- triggers go with them).
CREATE FUNCTION nvembed_vectorizer_drop_triggers(id integer, tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT g.tgrelid::regclass AS rel, g.tgname FROM pg_trigger g
        WHERE g.tgrelid IN (SELECT tbl UNION SELECT p.relid FROM pg_partition_tree(tbl) p) AND g.tgparentid = 0
          AND g.tgname IN (SELECT format('nvembed_vectorizer_%s_%s', id, kind)
                           FROM unnest(ARRAY['insert', 'moved', 'update', 'rekey', 'replica_insert']) AS kind)
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
END;
$$;

-- Removes the vectorizer of `target_column` of `tbl`: its triggers, queue and failures. The
-- vectors already written stay.
CREATE FUNCTION nvembed_drop_vectorizer(tbl regclass, target_column text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id integer;
BEGIN
    SELECT v.id INTO v_id FROM @extschema@.nvembed_vectorizer v WHERE v.tbl = $1 AND v.target_column = $2;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no vectorizer fills column % of %', quote_ident(target_column), tbl
            USING ERRCODE = 'undefined_object', HINT = 'SELECT * FROM nvembed_vectorizer_status lists the vectorizers.';
    END IF;
    IF NOT @extschema@.nvembed_vectorizer_managed(v_id) THEN
        RAISE EXCEPTION 'permission denied to drop the vectorizer of % of %', quote_ident(target_column), tbl
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only a role that may update the column may drop its vectorizer.';
    END IF;
    PERFORM @extschema@.nvembed_vectorizer_drop_triggers(v_id, tbl);
    PERFORM @extschema@.nvembed_vectorizer_forget(ARRAY[v_id]);
END;
$$;

-- Removes the chunk vectorizer that fills `chunk_table`: its triggers, queue and failures. The
-- chunk table stays, as it is (DROP TABLE drops the vectorizer with it).
CREATE FUNCTION nvembed_drop_vectorizer(chunk_table regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
BEGIN
    SELECT * INTO v FROM @extschema@.nvembed_vectorizer x WHERE x.chunk_table = $1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no vectorizer fills %', chunk_table
            USING ERRCODE = 'undefined_object', HINT = 'SELECT * FROM nvembed_vectorizer_status lists the vectorizers.';
    END IF;
    IF NOT @extschema@.nvembed_vectorizer_managed(v.id) THEN
        RAISE EXCEPTION 'permission denied to drop the vectorizer of %', chunk_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only a role that may insert into and delete from the chunk table may drop its vectorizer.';
    END IF;
    PERFORM @extschema@.nvembed_vectorizer_drop_triggers(v.id, v.tbl);
    PERFORM @extschema@.nvembed_vectorizer_forget(ARRAY[v.id]);
END;
$$;

-- Queues the failed rows of vectorizer `id` again, with fresh attempts. Returns how many.
CREATE FUNCTION nvembed_vectorizer_retry_failed(id integer) RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH v AS (SELECT v.id FROM @extschema@.nvembed_vectorizer v WHERE v.id = $1),
         moved AS (DELETE FROM @extschema@.nvembed_vectorizer_failure f USING v WHERE f.vectorizer_id = v.id
                   RETURNING f.vectorizer_id, f.row_key),
         queued AS (INSERT INTO @extschema@.nvembed_vectorizer_queue (vectorizer_id, row_key)
                    SELECT moved.vectorizer_id, moved.row_key FROM moved RETURNING 1)
    SELECT count(*) FROM moved;
END;

-- Queues the failed rows of the vectorizer of `target_column` of `tbl` again, with fresh
-- attempts. Returns how many.
CREATE FUNCTION nvembed_vectorizer_retry(tbl regclass, target_column text) RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
RETURN @extschema@.nvembed_vectorizer_retry_failed(
    (SELECT v.id FROM @extschema@.nvembed_vectorizer v WHERE v.tbl = $1 AND v.target_column = $2));

-- The same for the chunk vectorizer that fills `chunk_table`.
CREATE FUNCTION nvembed_vectorizer_retry(chunk_table regclass) RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
RETURN @extschema@.nvembed_vectorizer_retry_failed(
    (SELECT v.id FROM @extschema@.nvembed_vectorizer v WHERE v.chunk_table = $1));

-- A vectorizer goes with its table, its source or target column, or its chunk table.
CREATE FUNCTION nvembed_vectorizer_on_drop() RETURNS event_trigger
LANGUAGE plpgsql
-- The dropping role may not be the one that manages the vectorizer.
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    gone integer[];
    column_gone record;
BEGIN
    SELECT array_agg(v.id) INTO gone
    FROM @extschema@.nvembed_vectorizer v
    JOIN pg_event_trigger_dropped_objects() d ON d.classid = 'pg_class'::regclass
    WHERE (d.objid = v.tbl AND (d.objsubid = 0 OR d.address_names[3] IN (v.source_column, v.target_column)))
       OR (d.objid = v.chunk_table AND d.objsubid = 0);
    IF gone IS NOT NULL THEN
        -- A dropped column leaves the table with the vectorizer's other triggers.
        FOR column_gone IN
            SELECT v.id, v.tbl FROM @extschema@.nvembed_vectorizer v
            WHERE v.id = ANY (gone) AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = v.tbl)
        LOOP
            PERFORM @extschema@.nvembed_vectorizer_drop_triggers(column_gone.id, column_gone.tbl);
        END LOOP;
        PERFORM @extschema@.nvembed_vectorizer_forget(gone);
    END IF;
END;
$$;

CREATE EVENT TRIGGER nvembed_vectorizer_on_drop ON sql_drop EXECUTE FUNCTION nvembed_vectorizer_on_drop();

-- After CREATE TABLE and ALTER TABLE:
--   * a partition created in, or attached to, a vectorized table gets the vectorizer's statement
--     triggers, for statements that name it directly (those naming an ancestor fire the
--     ancestor's; the row triggers are cloned by PostgreSQL). CREATE TABLE ... PARTITION OF
--     names the partition; ALTER TABLE ... ATTACH PARTITION names the parent;
--   * a vectorized table may not become a partition or get inheritance children (the
--     vectorizer would miss rows written to them; nvembed_create_vectorizer refuses the same);
--   * a renamed source, target or key column is followed: a RENAME COLUMN renames one column,
--     so the one name of a vectorizer of the table that no longer exists is the renamed one;
--   * the vectorizer's row triggers fire as nvembed_vectorizer_set_firing says.
CREATE FUNCTION nvembed_vectorizer_on_alter() RETURNS event_trigger
LANGUAGE plpgsql
-- The triggers are the vectorizer's, whoever adds the partition or renames the column.
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    missing record;
    offending record;
    renamed record;
BEGIN
    SELECT v.tbl, c.relispartition INTO offending
    FROM pg_event_trigger_ddl_commands() d
    JOIN @extschema@.nvembed_vectorizer v
      ON v.tbl = d.objid
         OR v.tbl IN (SELECT i.inhparent FROM pg_inherits i WHERE i.inhrelid = d.objid)
         OR v.tbl IN (SELECT i.inhrelid FROM pg_inherits i WHERE i.inhparent = d.objid)
    JOIN pg_class c ON c.oid = v.tbl
    WHERE d.classid = 'pg_class'::regclass
      AND (c.relispartition
           OR EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class k ON k.oid = i.inhrelid
                      WHERE i.inhparent = v.tbl AND NOT k.relispartition))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '% has a vectorizer: it cannot %', offending.tbl,
            CASE WHEN offending.relispartition THEN 'become a partition' ELSE 'have inheritance children' END
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Drop the vectorizer first: SELECT nvembed_drop_vectorizer(%L, ...).', offending.tbl);
    END IF;
    -- Only where exactly one name is missing: more (a column dropped before, or renames this
    -- trigger did not see) are not guessed at; the status view reports them.
    FOR renamed IN
        SELECT v.id, m.old_name, a.attname AS new_name
        FROM pg_event_trigger_ddl_commands() d
        JOIN pg_attribute a ON a.attrelid = d.objid AND a.attnum = d.objsubid
        JOIN @extschema@.nvembed_vectorizer v ON v.tbl = d.objid
        CROSS JOIN LATERAL (SELECT min(c.name) AS old_name, count(DISTINCT c.name) AS missing
                            FROM unnest(array_remove(v.key_columns || ARRAY[v.source_column, v.target_column], NULL)) AS c(name)
                            WHERE NOT @extschema@.nvembed_vectorizer_has_column(v.tbl, c.name)) m
        WHERE d.classid = 'pg_class'::regclass AND d.objsubid > 0 AND d.object_type = 'table column' AND m.missing = 1
    LOOP
        UPDATE @extschema@.nvembed_vectorizer v
        SET source_column = CASE WHEN v.source_column = renamed.old_name THEN renamed.new_name ELSE v.source_column END,
            target_column = CASE WHEN v.target_column = renamed.old_name THEN renamed.new_name ELSE v.target_column END,
            key_columns = ARRAY(SELECT CASE WHEN k.name = renamed.old_name THEN renamed.new_name ELSE k.name END
                                FROM unnest(v.key_columns) WITH ORDINALITY AS k(name, n) ORDER BY k.n)
        WHERE v.id = renamed.id;
    END LOOP;
    FOR missing IN
        SELECT DISTINCT v.id, p.relid::regclass AS part
        FROM pg_event_trigger_ddl_commands() c
        JOIN pg_class r ON c.classid = 'pg_class'::regclass AND r.oid = c.objid AND r.relkind IN ('r', 'p')
        CROSS JOIN LATERAL pg_partition_tree(r.oid) p
        JOIN @extschema@.nvembed_vectorizer v
          ON v.tbl = r.oid OR v.tbl IN (SELECT a.relid FROM pg_partition_ancestors(r.oid) AS a(relid))
        WHERE p.relid <> v.tbl
          AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                          WHERE t.tgrelid = p.relid AND t.tgname = format('nvembed_vectorizer_%s_insert', v.id))
          -- Only once the vectorized table has its own: pg_restore alters tables (keys, indexes)
          -- before it creates the dumped triggers, the partitions' included.
          AND EXISTS (SELECT 1 FROM pg_trigger t
                      WHERE t.tgrelid = v.tbl AND t.tgname = format('nvembed_vectorizer_%s_insert', v.id))
    LOOP
        PERFORM @extschema@.nvembed_vectorizer_create_triggers(missing.id, missing.part);
        -- A table attached as a partition brings rows the triggers never saw.
        PERFORM @extschema@.nvembed_vectorizer_queue_existing(missing.id, missing.part);
    END LOOP;
    -- A new partition's clones, and `ALTER TABLE ... ENABLE TRIGGER ALL` after a bulk load (it
    -- makes every trigger fire in origin mode only): the row triggers fire as they must again.
    FOR missing IN
        SELECT DISTINCT v.id
        FROM pg_event_trigger_ddl_commands() d
        JOIN @extschema@.nvembed_vectorizer v
          ON v.tbl = d.objid OR v.tbl IN (SELECT a.relid FROM pg_partition_ancestors(d.objid) AS a(relid))
        WHERE d.classid = 'pg_class'::regclass
    LOOP
        PERFORM @extschema@.nvembed_vectorizer_set_firing(missing.id);
    END LOOP;
END;
$$;

CREATE EVENT TRIGGER nvembed_vectorizer_on_alter ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION nvembed_vectorizer_on_alter();

-- The pids of the vectorizer workers of this database that are running.
CREATE FUNCTION nvembed_vectorizer_workers() RETURNS SETOF integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.pid FROM pg_stat_activity a
    WHERE a.backend_type = 'nvembed vectorizer' AND a.datname = current_database()
$$;

-- Whether row-level security filters what the calling role reads of table `tbl` (false for a
-- table that is gone).
CREATE FUNCTION nvembed_vectorizer_rls_active(tbl oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) tbl)
            THEN pg_catalog.row_security_active(tbl) ELSE false END;

-- Whether the calling role sees the row with key `row_key` of vectorizer `vectorizer_id`'s table:
-- the views show the queued and failed rows of a table with row-level security only as far as
-- its policies show the rows themselves (their keys and errors may be another tenant's). Runs as
-- the caller, the table's policies applied; false for a key that cannot be matched any more.
CREATE FUNCTION nvembed_vectorizer_row_visible(vectorizer_id integer, row_key text) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
-- The key settings of nvembed_vectorizer_enqueue.
SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    visible boolean;
BEGIN
    SELECT * INTO v FROM @extschema@.nvembed_vectorizer WHERE id = $1;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s t WHERE %s)', v.tbl,
                   @extschema@.nvembed_vectorizer_key_matches(v.tbl, v.key_columns, 't', '$1'))
        INTO visible USING row_key::text[];
    RETURN visible;
EXCEPTION WHEN OTHERS THEN
    RETURN false;
END;
$$;

CREATE VIEW nvembed_vectorizer_status AS
WITH workers AS (SELECT pid FROM @extschema@.nvembed_vectorizer_workers() AS w(pid))
SELECT v.id, v.tbl, v.source_column, v.target_column, v.chunk_table, v.kind, v.owner,
       coalesce(q.pending, 0) AS pending,
       coalesce(q.in_progress, 0) AS in_progress,
       v.embedded,
       coalesce(f.failed, 0) AS failed,
       e.last_error,
       e.last_error_at,
       coalesce((SELECT sum(b.rows_embedded) FROM @extschema@.nvembed_vectorizer_batch b
                 WHERE b.vectorizer_id = v.id AND b.finished_at > pg_catalog.now() - interval '1 minute'), 0)::double precision
           / 60 AS rows_per_second,
       pg_catalog.now() - q.oldest_pending AS oldest_pending_age
FROM @extschema@.nvembed_vectorizer v
-- Under row-level security only the entries of rows the role sees count.
CROSS JOIN LATERAL (SELECT @extschema@.nvembed_vectorizer_rls_active(v.tbl) AS active) rls
LEFT JOIN LATERAL (
    -- Rows, not entries (a row may have several).
    SELECT count(DISTINCT row_key) FILTER (WHERE NOT claimed) AS pending,
           count(DISTINCT row_key) FILTER (WHERE claimed) AS in_progress,
           min(queued_at) FILTER (WHERE NOT claimed) AS oldest_pending
    FROM (SELECT q.row_key, q.queued_at, coalesce(q.claimed_by IN (SELECT pid FROM workers), false) AS claimed
          FROM @extschema@.nvembed_vectorizer_queue q
          WHERE q.vectorizer_id = v.id AND (NOT rls.active OR @extschema@.nvembed_vectorizer_row_visible(v.id, q.row_key))) AS entries
) q ON true
LEFT JOIN LATERAL (SELECT count(*) AS failed FROM @extschema@.nvembed_vectorizer_failure f
                   WHERE f.vectorizer_id = v.id AND (NOT rls.active OR @extschema@.nvembed_vectorizer_row_visible(v.id, f.row_key))) f ON true
LEFT JOIN LATERAL (
    SELECT errors.message AS last_error, errors.at AS last_error_at
    FROM (SELECT v.last_error, v.last_error_at
          -- A column renamed while the rename could not be followed, or dropped from a partition.
          UNION ALL SELECT pg_catalog.format('column %s of %s does not exist any more: the vectorizer queues no rows; drop it and create it again',
                                             pg_catalog.quote_ident(c.name), v.tbl), pg_catalog.now()
                    FROM pg_catalog.unnest(pg_catalog.array_remove(v.key_columns || ARRAY[v.source_column, v.target_column], NULL)) AS c(name)
                    WHERE NOT @extschema@.nvembed_vectorizer_has_column(v.tbl, c.name)
          UNION ALL SELECT q.last_error, q.last_attempt_at FROM @extschema@.nvembed_vectorizer_queue q
                    WHERE q.vectorizer_id = v.id AND q.last_error IS NOT NULL
                      AND (NOT rls.active OR @extschema@.nvembed_vectorizer_row_visible(v.id, q.row_key))
          UNION ALL SELECT f.last_error, f.last_attempt_at FROM @extschema@.nvembed_vectorizer_failure f
                    WHERE f.vectorizer_id = v.id
                      AND (NOT rls.active OR @extschema@.nvembed_vectorizer_row_visible(v.id, f.row_key))) AS errors(message, at)
    WHERE errors.message IS NOT NULL
    ORDER BY errors.at DESC LIMIT 1
) e ON true
-- The view runs with its owner's rights: each role sees the vectorizers of tables it may read.
WHERE CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) v.tbl)
           THEN pg_catalog.has_table_privilege(v.tbl, 'SELECT') END;

CREATE VIEW nvembed_vectorizer_failures AS
SELECT v.tbl, v.target_column, v.chunk_table, f.row_key::text[] AS row_key, f.attempts, f.last_error, f.last_attempt_at
FROM @extschema@.nvembed_vectorizer_failure f
JOIN @extschema@.nvembed_vectorizer v ON v.id = f.vectorizer_id
WHERE CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) v.tbl)
           THEN pg_catalog.has_table_privilege(v.tbl, 'SELECT') END
  -- Under row-level security, only the failures of rows the role sees.
  AND (NOT @extschema@.nvembed_vectorizer_rls_active(v.tbl) OR @extschema@.nvembed_vectorizer_row_visible(v.id, f.row_key));

GRANT SELECT ON nvembed_vectorizer_status, nvembed_vectorizer_failures TO PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The worker's side. claim, fail, release and settle touch only this extension's tables (as the
-- worker, a superuser; not granted to PUBLIC); read and write touch the vectorized table and run
-- as the vectorizer's owner (the worker switches to it around them).

-- The keys of a two-dimensional key array, one text[] each, numbered from 1.
CREATE FUNCTION nvembed_vectorizer_key_rows(keys text[]) RETURNS TABLE (key text[], n bigint)
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY(SELECT unnest(keys[i:i][:])), i FROM generate_series(1, array_length(keys, 1)) AS i
$$;

-- Claims up to `max_rows` due entries of one vectorizer (that of the first due entry met; the
-- queue is mostly in insertion order, and no sort of the whole queue is needed) for the calling
-- worker, and every other waiting entry of the same rows (a row is embedded once per claim).
-- Returns NULLs when nothing is due. `row_keys` is a two-dimensional text[] in its text form,
-- one key per row, to be handed back unchanged.
CREATE FUNCTION nvembed_vectorizer_claim(max_rows integer,
    OUT vectorizer_id integer, OUT owner oid, OUT instruction text, OUT max_length integer, OUT row_keys text,
    OUT chunk_tokens integer, OUT chunk_overlap integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    keys text[];
BEGIN
    -- Claims of workers that are gone (crash, restart, terminated) are free again. This
    -- claimer's own are not: it still holds them (a worker claims a batch per server).
    UPDATE @extschema@.nvembed_vectorizer_queue q SET claimed_by = NULL
    WHERE q.claimed_by IS NOT NULL AND q.claimed_by <> pg_backend_pid()
      AND q.claimed_by NOT IN (SELECT w FROM @extschema@.nvembed_vectorizer_workers() AS w);
    LOOP
        -- A row whose entry is claimed (an UPDATE queued it again while its old text is being
        -- embedded) waits until that claim settles: two batches in flight never hold one row,
        -- so settling one never releases or deletes the other's entries, and no row is
        -- written twice.
        SELECT * INTO v FROM @extschema@.nvembed_vectorizer
        WHERE id = (SELECT q.vectorizer_id FROM @extschema@.nvembed_vectorizer_queue q
                    WHERE q.claimed_by IS NULL AND q.next_attempt_at <= now()
                      AND NOT EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_queue held
                                      WHERE held.vectorizer_id = q.vectorizer_id AND held.row_key = q.row_key
                                        AND held.claimed_by IS NOT NULL)
                    LIMIT 1);
        IF NOT FOUND THEN
            -- Nothing due, or entries of a vectorizer that is gone: clean up.
            DELETE FROM @extschema@.nvembed_vectorizer_queue q
            WHERE NOT EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer v2 WHERE v2.id = q.vectorizer_id);
            IF FOUND THEN
                CONTINUE;
            END IF;
            RETURN;
        END IF;
        EXIT WHEN EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = v.tbl);
        RAISE LOG 'nvembed: table % of vectorizer % was dropped; dropping the vectorizer', v.tbl::oid, v.id;
        PERFORM @extschema@.nvembed_vectorizer_forget(ARRAY[v.id]);
    END LOOP;
    WITH due AS (
        SELECT q.ctid FROM @extschema@.nvembed_vectorizer_queue q
        WHERE q.vectorizer_id = v.id AND q.claimed_by IS NULL AND q.next_attempt_at <= now()
          AND NOT EXISTS (SELECT 1 FROM @extschema@.nvembed_vectorizer_queue held
                          WHERE held.vectorizer_id = q.vectorizer_id AND held.row_key = q.row_key
                            AND held.claimed_by IS NOT NULL)
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE @extschema@.nvembed_vectorizer_queue q SET claimed_by = pg_backend_pid()
        FROM due WHERE q.ctid = due.ctid
        RETURNING q.row_key
    )
    SELECT array_agg(DISTINCT claimed.row_key) INTO keys FROM claimed;
    IF keys IS NULL THEN
        RETURN;
    END IF;
    WITH same_rows AS (
        SELECT q.ctid FROM @extschema@.nvembed_vectorizer_queue q
        WHERE q.vectorizer_id = v.id AND q.row_key = ANY (keys) AND q.claimed_by IS NULL
        FOR UPDATE SKIP LOCKED
    )
    UPDATE @extschema@.nvembed_vectorizer_queue q SET claimed_by = pg_backend_pid()
    FROM same_rows WHERE q.ctid = same_rows.ctid;
    vectorizer_id := v.id;
    owner := v.owner;
    instruction := v.instruction;
    max_length := v.max_length;
    chunk_tokens := v.chunk_tokens;
    chunk_overlap := v.chunk_overlap;
    -- As a two-dimensional text[]: one key per row.
    row_keys := (SELECT array_agg(k::text[]) FROM unnest(keys) AS k)::text;
END;
$$;

-- Run as the vectorizer's owner: the texts (UTF-8, whatever the database encoding) of the rows
-- with keys `row_keys`, NULL for a row that is gone (or hidden from the owner) or has no text;
-- errors[i] says why row i could not be read (NULL when it could). One row that cannot be read
-- (an invalid byte in an SQL_ASCII database, a source column whose conversion to text fails)
-- fails alone: when the batch's read fails, its rows are read one by one.
CREATE FUNCTION nvembed_vectorizer_read(vectorizer_id integer, row_keys text, OUT texts bytea[], OUT errors text[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- The key settings of nvembed_vectorizer_enqueue.
SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    keys text[] := row_keys::text[];
    read text;
    one_text bytea[];
BEGIN
    SELECT * INTO STRICT v FROM @extschema@.nvembed_vectorizer WHERE id = $1;
    errors := array_fill(NULL::text, ARRAY[array_length(keys, 1)]);
    BEGIN
        read := format('SELECT array_agg(convert_to(t.%I::text, ''UTF8'') ORDER BY k.n)
                        FROM @extschema@.nvembed_vectorizer_key_rows($1) AS k(key, n)
                        LEFT JOIN %s t ON %s',
                       v.source_column, v.tbl, @extschema@.nvembed_vectorizer_key_matches(v.tbl, v.key_columns, 't', 'k.key'));
        EXECUTE read INTO texts USING keys;
        RETURN;
    EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
        IF read IS NULL THEN
            -- The statement itself could not be made (the key changed): no row can be read.
            errors := array_fill(format('reading %s as %s: %s', v.tbl, current_user, SQLERRM), ARRAY[array_length(keys, 1)]);
            texts := array_fill(NULL::bytea, ARRAY[array_length(keys, 1)]);
            RETURN;
        END IF;
    END;
    texts := array_fill(NULL::bytea, ARRAY[array_length(keys, 1)]);
    FOR n IN 1 .. array_length(keys, 1) LOOP
        BEGIN
            EXECUTE read INTO one_text USING keys[n:n][:];
            texts[n] := one_text[1];
        EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
            errors[n] := format('reading %s as %s: %s', v.tbl, current_user, SQLERRM);
        END;
    END LOOP;
END;
$$;

-- Run as the vectorizer's owner: writes the vectors of a claimed batch, each only where the row,
-- locked, still has byte-for-byte the text that was embedded (a row whose text is now NULL gets
-- a NULL target). texts are the texts read (UTF-8); errors[i] is the model's error for text i
-- (such rows are left alone); `vectors` holds the vectors of the texts that are neither NULL nor
-- failed, in order, `dimension` floats each. Returns one outcome per row: 'written', 'changed'
-- (its text is not the embedded one any more), 'gone' (no such row for the owner), 'locked'
-- (another session holds it: skipped, never waited for), 'failed' (the model's error), or why
-- it was not written (its write failed, or the UPDATE left it alone). A failing batch write is retried row by row, so one row's failure (a
-- constraint, the table's own trigger, a missing privilege) never fails the others.
CREATE FUNCTION nvembed_vectorizer_write(vectorizer_id integer, row_keys text, texts bytea[], vectors real[],
                                         dimension integer, errors text[])
RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- The key settings of nvembed_vectorizer_enqueue.
SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET bytea_output = 'hex'
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    keys text[] := row_keys::text[];
    sources text[] := ARRAY(SELECT convert_from(t, 'UTF8') FROM unnest(texts) WITH ORDINALITY AS u(t, n) ORDER BY n);
    -- The table's own triggers fire on this write as on any other: they get the search_path a
    -- session of this database starts with (set around the EXECUTEs only; every name in the
    -- statement is schema-qualified).
    session_path text := (SELECT s.reset_val FROM pg_settings s WHERE s.name = 'search_path');
    write text;
    outcome text[];
    row_outcome text[];
BEGIN
    SELECT * INTO v FROM @extschema@.nvembed_vectorizer WHERE id = $1;
    IF NOT FOUND THEN
        RETURN NULL; -- dropped meanwhile
    END IF;
    -- $6: one row's number, or NULL for all. Rows are locked FOR NO KEY UPDATE SKIP LOCKED; a
    -- locked row whose text is the embedded one is always written (its vector, or NULL for a
    -- NULL text), so a REPEATABLE READ writer that read it before fails to update it, as it
    -- must, instead of deciding from a stale snapshot that it needs no queue entry.
    BEGIN
        write := format(
            'WITH b_all AS (SELECT k.key, k.n, $2[k.n] AS src, $5[k.n] IS NOT NULL AS model_failed,
                                   -- where its vector starts, among those of the texts embedded
                                   pg_catalog.count($2[k.n]) FILTER (WHERE $5[k.n] IS NULL) OVER (ORDER BY k.n) AS j
                            FROM @extschema@.nvembed_vectorizer_key_rows($1) AS k(key, n)),
                  batch_rows AS (SELECT * FROM b_all WHERE $6::pg_catalog.int8 IS NULL OR b_all.n OPERATOR(pg_catalog.=) $6),
                  b AS (SELECT * FROM batch_rows r WHERE NOT r.model_failed),
                  present AS (SELECT b.n FROM b JOIN %1$s t ON %2$s),
                  locked AS (SELECT t.tableoid AS rel, t.ctid AS row_id, b.n, b.src, b.j,
                                    COALESCE((t.%3$I::pg_catalog.text COLLATE pg_catalog."C") OPERATOR(pg_catalog.=) b.src,
                                                        t.%3$I IS NULL AND b.src IS NULL) AS same_text
                             FROM %1$s t JOIN b ON %2$s
                             FOR NO KEY UPDATE OF t SKIP LOCKED),
                  written AS (UPDATE %1$s t
                              SET %4$I = CASE WHEN l.src IS NULL THEN NULL
                                              ELSE $3[(l.j OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) $4 OPERATOR(pg_catalog.+) 1
                                                      : l.j OPERATOR(pg_catalog.*) $4] END
                              FROM locked l
                              WHERE l.same_text AND t.tableoid OPERATOR(pg_catalog.=) l.rel AND t.ctid OPERATOR(pg_catalog.=) l.row_id
                              RETURNING l.n)
             SELECT pg_catalog.array_agg(CASE WHEN r.model_failed THEN ''failed''
                                              WHEN r.n OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT n FROM written)) THEN ''written''
                                              WHEN r.n OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT n FROM locked WHERE NOT same_text)) THEN ''changed''
                                              WHEN r.n OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT n FROM locked))
                                                  THEN ''the row was not written: a trigger skipped it, or row-level security hides it from UPDATE''
                                              WHEN r.n OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT n FROM present)) THEN ''locked''
                                              ELSE ''gone'' END ORDER BY r.n)
             FROM batch_rows r',
            v.tbl, @extschema@.nvembed_vectorizer_key_matches(v.tbl, v.key_columns, 't', 'b.key'), v.source_column, v.target_column);
    EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
        RETURN array_fill(format('writing %s.%s as %s: %s', v.tbl, quote_ident(v.target_column), current_user, SQLERRM),
                          ARRAY[array_length(keys, 1)]);
    END;
    BEGIN
        PERFORM pg_catalog.set_config('search_path', session_path, true);
        EXECUTE write INTO outcome USING keys, sources, vectors, dimension, errors, NULL::bigint;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    -- (Also a statement_timeout, or a trigger's ASSERT: whatever the table does fails its rows,
    -- never the worker.)
    EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
        outcome := array_fill(NULL::text, ARRAY[array_length(keys, 1)]);
        FOR n IN 1 .. array_length(keys, 1) LOOP
            IF errors[n] IS NOT NULL THEN
                outcome[n] := 'failed';
                CONTINUE;
            END IF;
            BEGIN
                PERFORM pg_catalog.set_config('search_path', session_path, true);
                EXECUTE write INTO row_outcome USING keys, sources, vectors, dimension, errors, n::bigint;
                PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
                outcome[n] := row_outcome[1];
            EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
                outcome[n] := format('writing %s.%s as %s: %s', v.tbl, quote_ident(v.target_column), current_user, SQLERRM);
            END;
        END LOOP;
    END;
    RETURN outcome;
END;
$$;

-- Run as the vectorizer's owner: replaces the chunks of the rows of a claimed batch of chunk
-- vectorizer `vectorizer_id`, each only where the row still has byte-for-byte the text that was
-- chunked (a row whose text is now NULL loses its chunks, and so does one the owner cannot see
-- any more: deleted, or hidden from it by row-level security). texts and errors as for
-- nvembed_vectorizer_write; the chunks of the rows embedded are chunks[i] (UTF-8), of row
-- chunk_rows[i], in order, with vectors `dimension` floats each. A row's old chunks are deleted
-- and its new ones inserted in this transaction, which also settles its queue entries: a crash
-- leaves the old chunks and the entries, never half of either. No lock is taken on the row (the
-- owner may only read the table): a text that changes after the check has queued the row again
-- (its enqueue trigger found the entry claimed), so its new chunks follow. Returns one outcome
-- per row, as nvembed_vectorizer_write does ('locked': the row is being deleted or its key
-- changed by a transaction still open; 'gone' also when it went while being written).
CREATE FUNCTION nvembed_vectorizer_write_chunks(vectorizer_id integer, row_keys text, texts bytea[], errors text[],
                                                chunk_rows integer[], chunks bytea[], vectors real[], dimension integer)
RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- The key settings of nvembed_vectorizer_enqueue.
SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET bytea_output = 'hex'
-- A new chunk's foreign key check waits for a transaction that is deleting its row or changing
-- its key: never for long (the row is tried again in a second).
SET lock_timeout = '100ms'
AS $$
DECLARE
    v @extschema@.nvembed_vectorizer;
    keys text[] := row_keys::text[];
    sources text[] := ARRAY(SELECT convert_from(t, 'UTF8') FROM unnest(texts) WITH ORDINALITY AS u(t, n) ORDER BY n);
    -- The session's search_path for the chunk table's own triggers (see nvembed_vectorizer_write).
    session_path text := (SELECT s.reset_val FROM pg_settings s WHERE s.name = 'search_path');
    classify text;
    clear text;
    fill text;
    outcome text[];
    row_outcome text[];
    -- Rows whose chunks go (their text is the one cut, or they are gone for the owner: deleted,
    -- or hidden by row-level security, whose old chunks must not stay searchable), and rows
    -- whose new chunks come.
    cleared integer[];
    unchanged integer[];
BEGIN
    SELECT * INTO v FROM @extschema@.nvembed_vectorizer WHERE id = $1;
    IF NOT FOUND THEN
        RETURN NULL; -- dropped meanwhile
    END IF;
    BEGIN
        -- $4: one row's number, or NULL for all.
        classify := format(
            'WITH b AS (SELECT k.key, k.n, $2[k.n] AS src FROM @extschema@.nvembed_vectorizer_key_rows($1) AS k(key, n)
                        WHERE $3[k.n] IS NULL AND ($4::pg_catalog.int8 IS NULL OR k.n OPERATOR(pg_catalog.=) $4)),
                  found AS (SELECT b.n, COALESCE((t.%3$I::pg_catalog.text COLLATE pg_catalog."C") OPERATOR(pg_catalog.=) b.src,
                                                        t.%3$I IS NULL AND b.src IS NULL) AS same_text
                            FROM %1$s t JOIN b ON %2$s)
             SELECT pg_catalog.array_agg(CASE WHEN $3[k.n] IS NOT NULL THEN ''failed''
                                              WHEN k.n OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT n FROM found WHERE same_text)) THEN ''written''
                                              WHEN k.n OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT n FROM found)) THEN ''changed''
                                              ELSE ''gone'' END ORDER BY k.n)
             FROM @extschema@.nvembed_vectorizer_key_rows($1) AS k(key, n)
             WHERE $4::pg_catalog.int8 IS NULL OR k.n OPERATOR(pg_catalog.=) $4',
            v.tbl, @extschema@.nvembed_vectorizer_key_matches(v.tbl, v.key_columns, 't', 'b.key'), v.source_column);
        SELECT format(
            'DELETE FROM %1$s c USING @extschema@.nvembed_vectorizer_key_rows($1) AS b(key, n)
             WHERE b.n OPERATOR(pg_catalog.=) ANY ($2) AND %2$s',
            v.chunk_table, string_agg(format('c.%I %s (b.key)[%s]::%s', k.chunk_column, k.equals, k.key_position, k.type_name),
                                      ' AND ' ORDER BY k.key_position)),
               format(
            'INSERT INTO %1$s (%2$s, chunk_seq, chunk, embedding)
             SELECT %3$s, s.seq, pg_catalog.convert_from(s.chunk, ''UTF8''),
                    $4[(s.i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) $5 OPERATOR(pg_catalog.+) 1 : s.i OPERATOR(pg_catalog.*) $5]
             FROM @extschema@.nvembed_vectorizer_key_rows($1) AS b(key, n)
             JOIN (SELECT u.n, u.chunk, u.i, pg_catalog.row_number() OVER (PARTITION BY u.n ORDER BY u.i)::pg_catalog.int4 AS seq
                   FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.int4[]), pg_catalog.unnest($3::pg_catalog.bytea[])) WITH ORDINALITY AS u(n, chunk, i)) s
               ON s.n OPERATOR(pg_catalog.=) b.n
             WHERE b.n OPERATOR(pg_catalog.=) ANY ($6)',
            v.chunk_table, string_agg(quote_ident(k.chunk_column), ', ' ORDER BY k.key_position),
            string_agg(format('(b.key)[%s]::%s', k.key_position, k.type_name), ', ' ORDER BY k.key_position))
        INTO clear, fill
        FROM @extschema@.nvembed_vectorizer_chunk_key(v.chunk_table, v.tbl) k
        HAVING array_agg(k.column_name ORDER BY k.key_position) = v.key_columns;
        IF fill IS NULL THEN
            RAISE EXCEPTION 'the foreign key of % to the primary key (%) of % is gone', v.chunk_table,
                array_to_string(v.key_columns, ', '), v.tbl;
        END IF;
    EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
        RETURN array_fill(format('writing the chunks of %s into %s as %s: %s', v.tbl, v.chunk_table, current_user, SQLERRM),
                          ARRAY[array_length(keys, 1)]);
    END;
    BEGIN
        EXECUTE classify INTO outcome USING keys, sources, errors, NULL::bigint;
        unchanged := ARRAY(SELECT n FROM generate_series(1, cardinality(outcome)) AS n WHERE outcome[n] = 'written');
        cleared := ARRAY(SELECT n FROM generate_series(1, cardinality(outcome)) AS n WHERE outcome[n] IN ('written', 'gone'));
        -- The chunk table's own triggers fire on these, with the session's search_path.
        PERFORM pg_catalog.set_config('search_path', session_path, true);
        EXECUTE clear USING keys, cleared;
        EXECUTE fill USING keys, chunk_rows, chunks, vectors, dimension, unchanged;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    -- One row's failure (a constraint or trigger of the chunk table, a row on its way out) never
    -- fails the others: the batch is written again row by row.
    EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
        outcome := array_fill(NULL::text, ARRAY[array_length(keys, 1)]);
        FOR n IN 1 .. array_length(keys, 1) LOOP
            IF errors[n] IS NOT NULL THEN
                outcome[n] := 'failed';
                CONTINUE;
            END IF;
            BEGIN
                EXECUTE classify INTO row_outcome USING keys, sources, errors, n::bigint;
                outcome[n] := row_outcome[1];
                IF outcome[n] IN ('written', 'gone') THEN
                    PERFORM pg_catalog.set_config('search_path', session_path, true);
                    EXECUTE clear USING keys, ARRAY[n];
                    IF outcome[n] = 'written' THEN
                        EXECUTE fill USING keys, chunk_rows, chunks, vectors, dimension, ARRAY[n];
                    END IF;
                    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
                END IF;
            EXCEPTION
                WHEN lock_not_available THEN
                    outcome[n] := 'locked';
                WHEN foreign_key_violation THEN
                    outcome[n] := 'gone';
                WHEN OTHERS OR query_canceled OR assert_failure THEN
                    outcome[n] := format('writing the chunks of %s into %s as %s: %s', v.tbl, v.chunk_table, current_user, SQLERRM);
            END;
        END LOOP;
    END;
    RETURN outcome;
END;
$$;

-- An attempt failed for each of the worker's entries of the rows with keys `row_keys` (errors[i]
-- for key i): back off (1 s, doubling, at most 10 min) or, after
-- nvembed.vectorizer_max_attempts, move them to the failures.
CREATE FUNCTION nvembed_vectorizer_fail(vectorizer_id integer, row_keys text, errors text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    max_attempts integer := current_setting('nvembed.vectorizer_max_attempts')::integer;
BEGIN
    UPDATE @extschema@.nvembed_vectorizer_queue q
    SET attempts = q.attempts + 1, last_error = errors[k.n], last_attempt_at = clock_timestamp(), claimed_by = NULL,
        next_attempt_at = clock_timestamp() + interval '1 s' * power(2, least(q.attempts, 10))
    FROM @extschema@.nvembed_vectorizer_key_rows(row_keys::text[]) AS k
    WHERE q.vectorizer_id = $1 AND q.row_key = k.key::text AND q.claimed_by = pg_backend_pid();
    WITH moved AS (
        DELETE FROM @extschema@.nvembed_vectorizer_queue q
        WHERE q.vectorizer_id = $1 AND q.attempts >= max_attempts
          AND q.row_key IN (SELECT k.key::text FROM @extschema@.nvembed_vectorizer_key_rows(row_keys::text[]) AS k)
        RETURNING q.vectorizer_id, q.row_key, q.attempts, q.last_error, q.last_attempt_at
    )
    INSERT INTO @extschema@.nvembed_vectorizer_failure AS f (vectorizer_id, row_key, attempts, last_error, last_attempt_at)
    SELECT DISTINCT ON (m.row_key) m.vectorizer_id, m.row_key, m.attempts, m.last_error, m.last_attempt_at FROM moved m
    ORDER BY m.row_key, m.attempts DESC
    ON CONFLICT ON CONSTRAINT nvembed_vectorizer_failure_pkey DO UPDATE
        SET attempts = excluded.attempts, last_error = excluded.last_error, last_attempt_at = excluded.last_attempt_at;
END;
$$;

-- The batch could not be embedded for a reason that is no text's fault (model server
-- unreachable, model not loadable): the entries wait for the next claim, attempts unchanged.
CREATE FUNCTION nvembed_vectorizer_release(vectorizer_id integer, row_keys text, error text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE @extschema@.nvembed_vectorizer_queue q SET claimed_by = NULL
    WHERE q.vectorizer_id = $1 AND q.claimed_by = pg_backend_pid()
      AND q.row_key IN (SELECT k.key::text FROM @extschema@.nvembed_vectorizer_key_rows(row_keys::text[]) AS k);
    UPDATE @extschema@.nvembed_vectorizer v SET last_error = error, last_error_at = clock_timestamp() WHERE v.id = $1;
END;

-- Settles the worker's entries of a written batch by each row's outcome (nvembed_vectorizer_write;
-- 'failed' rows take their error from errors[i]):
--   written, gone: removed (and a written row leaves the failures);
--   changed: queued again, due now, attempts unchanged;
--   locked: queued again, due in a second, attempts unchanged;
--   anything else: a failed attempt with that reason.
-- Returns how many vectors were written.
CREATE FUNCTION nvembed_vectorizer_settle(vectorizer_id integer, row_keys text, texts bytea[], outcome text[], errors text[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    written integer;
BEGIN
    DELETE FROM @extschema@.nvembed_vectorizer_queue q
    USING @extschema@.nvembed_vectorizer_key_rows(row_keys::text[]) AS k
    WHERE q.vectorizer_id = $1 AND q.claimed_by = pg_backend_pid() AND q.row_key = k.key::text
      AND outcome[k.n] IN ('written', 'gone');
    DELETE FROM @extschema@.nvembed_vectorizer_failure f
    USING @extschema@.nvembed_vectorizer_key_rows(row_keys::text[]) AS k
    WHERE f.vectorizer_id = $1 AND f.row_key = k.key::text AND outcome[k.n] = 'written';
    UPDATE @extschema@.nvembed_vectorizer_queue q
    SET claimed_by = NULL,
        next_attempt_at = CASE outcome[k.n] WHEN 'locked' THEN clock_timestamp() + interval '1 s' ELSE '-infinity' END
    FROM @extschema@.nvembed_vectorizer_key_rows(row_keys::text[]) AS k
    WHERE q.vectorizer_id = $1 AND q.claimed_by = pg_backend_pid() AND q.row_key = k.key::text
      AND outcome[k.n] IN ('changed', 'locked');
    PERFORM @extschema@.nvembed_vectorizer_fail($1, array_agg(k.key ORDER BY k.n)::text,
                                                 array_agg(CASE outcome[k.n] WHEN 'failed' THEN errors[k.n] ELSE outcome[k.n] END
                                                           ORDER BY k.n))
    FROM @extschema@.nvembed_vectorizer_key_rows(row_keys::text[]) AS k
    WHERE outcome[k.n] NOT IN ('written', 'gone', 'changed', 'locked')
    HAVING count(*) > 0;
    -- Vectors written (not the NULLs written for rows whose text became NULL).
    SELECT count(*) INTO written FROM generate_series(1, cardinality(outcome)) AS n
    WHERE outcome[n] = 'written' AND texts[n] IS NOT NULL;
    IF written > 0 THEN
        UPDATE @extschema@.nvembed_vectorizer v SET embedded = v.embedded + written, last_error = NULL, last_error_at = NULL
        WHERE v.id = $1;
        INSERT INTO @extschema@.nvembed_vectorizer_batch VALUES ($1, clock_timestamp(), written);
    END IF;
    DELETE FROM @extschema@.nvembed_vectorizer_batch b WHERE b.finished_at < now() - interval '1 minute';
    RETURN written;
END;
$$;

REVOKE EXECUTE ON FUNCTION nvembed_vectorizer_claim(integer), nvembed_vectorizer_fail(integer, text, text[]),
    nvembed_vectorizer_release(integer, text, text), nvembed_vectorizer_settle(integer, text, bytea[], text[], text[])
    FROM PUBLIC;

-- Search at scale.
--
-- pgvector indexes `vector` up to 2,000 dimensions and `halfvec` up to 4,000; NV-Embed-v2 gives
-- 4,096. Such columns are indexed by one sign bit per dimension (binary_quantize(...)::bit(n), an
-- HNSW index with Hamming distance) and searched in two steps: the index's nearest candidates,
-- then the exact inner product over those candidates only.
--
-- The bits are the signs of the vector itself by default. Embeddings of decoder models share a
-- common direction, so many of those bits are the same for every row; the signs of the vector
-- minus the column's mean (`centred => true`) spread the bits, but scripts/bench-search.sh
-- measured them no better and mostly a little worse (README): the Hamming distance of raw signs
-- estimates the angle between query and row, which for unit vectors is the ranking itself, while
-- centred signs estimate the angle between the centred vectors, which leaves out each row's own
-- share of the common direction. A centre is an IMMUTABLE SQL function of its own beside the
-- table, `<table>_<column>_centre()`, which the index expression calls: a 4,096-dim constant
-- written into the expression would not fit in pg_index's row (pg_index has no TOAST), and the
-- planner inlines the function, so queries match the index as if the constant were written out.
-- Nothing else is recorded: nvembed_search finds the index (and its centre function) in the
-- index definition, so a dropped or renamed index, pg_dump and restore, and a standby need no
-- bookkeeping, and an index made by hand as binary_quantize(column)::bit(n) is used too.
--
-- nvembed_search is SECURITY INVOKER and does not pin search_path: the caller's filter is the
-- caller's SQL, resolved as the caller's own WHERE clause would be. Everything nvembed adds to
-- the statements is schema-qualified.

-- Limits, as named constants (functions, so the tests and the README read the same numbers).
-- Rows the centre is computed from: a mean of 50,000 unit vectors is within ~0.005 per
-- dimension of the column's, far below the spread of the bits it centres.
CREATE FUNCTION nvembed_search_centre_sample_rows() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN 50000;
-- Candidates the index gives for re-ranking when the caller does not say (README, "Search and
-- indexing", has what the benchmark measured at this and other numbers).
CREATE FUNCTION nvembed_search_default_candidates(k integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN pg_catalog.int8smaller(2147483647, pg_catalog.int8larger(200, k::pg_catalog.int8 OPERATOR(pg_catalog.*) 10))::pg_catalog.int4;

-- A search's filter, as one argument: the planner inlines it and sees the condition itself (for
-- index use and partition pruning), and a filter that tried to close the parentheses around it
-- would need a top-level comma, which is an error.
CREATE FUNCTION nvembed_search_condition(boolean) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN $1;

-- The schema pgvector is installed in; an ERROR naming the fix if it is not installed, or too
-- old for binary_quantize (0.7.0).
CREATE FUNCTION nvembed_search_vector_schema() RETURNS name
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    schema name;
    version text;
BEGIN
    SELECT n.nspname, e.extversion INTO schema, version
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'vector';
    IF schema IS NULL THEN
        RAISE EXCEPTION 'pgvector is not installed in this database' USING ERRCODE = 'undefined_object',
            HINT = 'CREATE EXTENSION vector;';
    END IF;
    IF string_to_array(version, '.')::integer[] < ARRAY[0, 7] THEN
        RAISE EXCEPTION 'pgvector % has no binary_quantize; nvembed''s search needs 0.7.0 or later', version
            USING ERRCODE = 'feature_not_supported', HINT = 'ALTER EXTENSION vector UPDATE;';
    END IF;
    RETURN schema;
END;
$$;

-- The column of `tbl` to search: `requested_column`, or the table's one vector/halfvec column when
-- NULL. It must be vector(n) or halfvec(n) with n fixed (an index of bit(n) can hold nothing
-- else) and, when `against_model` and a model is loaded, n must be the model's dimension (a
-- search checks its query vector instead: asking the model server costs a round trip).
CREATE FUNCTION nvembed_search_column(tbl regclass, requested_column name, against_model boolean,
                                      OUT column_name name, OUT type_name name, OUT dimensions integer)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    relkind "char";
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    type_schema name;
    type_oid oid;
    model_dimension integer;
    found_columns name[];
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'the table must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relkind INTO relkind FROM pg_class c WHERE c.oid = tbl;
    IF relkind IS NULL OR relkind NOT IN ('r', 'p', 'm') THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = 'wrong_object_type',
            HINT = 'Search and its index are for tables, partitioned tables and materialized views.';
    END IF;
    IF $2 IS NULL THEN
        SELECT array_agg(a.attname ORDER BY a.attnum) INTO found_columns
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
          AND t.typname IN ('vector', 'halfvec') AND n.nspname = vector_schema;
        IF found_columns IS NULL THEN
            RAISE EXCEPTION '% has no vector or halfvec column', tbl USING ERRCODE = 'undefined_column',
                HINT = 'nvembed searches a vector(n) or halfvec(n) column that holds nvembed''s embeddings.';
        ELSIF cardinality(found_columns) > 1 THEN
            RAISE EXCEPTION '% has % vector columns (%)', tbl, cardinality(found_columns), array_to_string(found_columns, ', ')
                USING ERRCODE = 'ambiguous_column', HINT = 'Name the one to search: column_name => ''...''.';
        END IF;
        column_name := found_columns[1];
    ELSE
        column_name := $2;
    END IF;
    SELECT a.atttypid, t.typname, n.nspname, a.atttypmod INTO type_oid, type_name, type_schema, dimensions
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE a.attrelid = tbl AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column % of relation % does not exist', quote_ident(column_name), tbl USING ERRCODE = 'undefined_column';
    END IF;
    IF type_name NOT IN ('vector', 'halfvec') OR type_schema <> vector_schema THEN
        RAISE EXCEPTION 'column % of % has type %, not vector(n) or halfvec(n)', quote_ident(column_name), tbl,
            format_type(type_oid, dimensions)
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE vector(n) USING %I::vector(n), with n the model''s dimension.',
                                tbl, column_name, column_name);
    END IF;
    IF dimensions <= 0 THEN
        RAISE EXCEPTION 'column % of % has no fixed dimension', quote_ident(column_name), tbl USING ERRCODE = 'datatype_mismatch',
            HINT = format('An index of sign bits needs every row to have the same length: ALTER TABLE %s ALTER COLUMN %I TYPE %s(n), with n the model''s dimension.',
                          tbl, column_name, type_name);
    END IF;
    IF against_model THEN
        model_dimension := @extschema@.nvembed_model_dimension();
    END IF;
    IF model_dimension IS NOT NULL AND dimensions <> model_dimension THEN
        RAISE EXCEPTION 'column % of % has % dimensions, but the model''s vectors have %', quote_ident(column_name), tbl,
            dimensions, model_dimension
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE %s(%s), and embed the column again.', tbl, column_name, type_name, model_dimension);
    END IF;
END;
$$;

-- The index expression over `column_name`: sign bits of the column minus the centre function
-- that `centre_call` calls, or of the column itself when `centre_call` is NULL. Written as
-- pg_get_expr prints it when search_path is pg_catalog alone (names in pg_catalog unqualified,
-- others qualified), so nvembed_search_index can compare the two.
CREATE FUNCTION nvembed_search_index_expression(column_name name, dimensions integer, centre_call text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    qualifier text := CASE WHEN vector_schema = 'pg_catalog' THEN '' ELSE quote_ident(vector_schema) || '.' END;
    minus text := CASE WHEN vector_schema = 'pg_catalog' THEN '-' ELSE format('OPERATOR(%I.-)', vector_schema) END;
BEGIN
    IF centre_call IS NULL THEN
        RETURN format('(%sbinary_quantize(%I))::bit(%s)', qualifier, column_name, dimensions);
    END IF;
    RETURN format('(%sbinary_quantize((%I %s %s)))::bit(%s)', qualifier, column_name, minus, centre_call, dimensions);
END;
$$;

-- How an index expression calls centre function `centre`: qualified, and a function of the
-- session's own temporary schema as pg_temp.name() (as pg_get_expr prints it).
CREATE FUNCTION nvembed_search_centre_call(centre regprocedure) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT CASE WHEN p.pronamespace = pg_my_temp_schema() THEN 'pg_temp.' || quote_ident(p.proname) || '()'
                    ELSE centre::text END
        FROM pg_proc p WHERE p.oid = centre);

-- The valid sign-bit index of `tbl`'s `column_name`, centred ones first, with its expression and
-- its centre function's call (both fully schema-qualified; the call NULL for an un-centred
-- index); no row if there is none. A centre function is one the index depends on that is
-- IMMUTABLE, takes nothing and returns the column's type. Read from the catalog on every call:
-- an index dropped or created since is seen at once.
CREATE FUNCTION nvembed_search_index(tbl regclass, column_name name, dimensions integer,
                                     OUT index regclass, OUT expression text, OUT centre text)
RETURNS SETOF record
LANGUAGE plpgsql STABLE -- not sql: a PL/pgSQL function keeps its plan for the session
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT i.index, i.expression, centre.call
    FROM (SELECT x.indexrelid, x.indexrelid::regclass AS index, pg_get_expr(x.indexprs, x.indrelid) AS expression
          FROM pg_index x
          JOIN pg_class c ON c.oid = x.indexrelid
          JOIN pg_am am ON am.oid = c.relam
          JOIN pg_opclass o ON o.oid = x.indclass[0]
          JOIN pg_namespace n ON n.oid = o.opcnamespace
          WHERE x.indrelid = $1 AND am.amname = 'hnsw' AND o.opcname = 'bit_hamming_ops'
            AND n.nspname = (SELECT @extschema@.nvembed_search_vector_schema())
            AND x.indisvalid AND x.indisready AND x.indnkeyatts = 1 AND x.indkey[0] = 0 AND x.indpred IS NULL) i
    LEFT JOIN (pg_depend d JOIN pg_proc f ON f.oid = d.refobjid AND f.provolatile = 'i' AND f.pronargs = 0
                                         AND f.prorettype = (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = $1 AND a.attname = $2))
           ON d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid AND d.refclassid = 'pg_proc'::regclass
    CROSS JOIN LATERAL (SELECT @extschema@.nvembed_search_centre_call(f.oid::regprocedure) AS call) centre
    WHERE i.expression = @extschema@.nvembed_search_index_expression($2, $3, centre.call)
    ORDER BY f.oid IS NULL, i.index;
END;
$$;

-- The CREATE INDEX statement of a search index of `tbl`'s column `column_name` (of pgvector's
-- `type_name`, `dimensions` long, as nvembed_search_column found it). A centred one computes
-- the column's mean now, from a sample of up to nvembed_search_centre_sample_rows() rows, and
-- creates its centre function in the table's schema: `<table>_<column>_centre()`, or that name
-- with a number when it is taken (an index that would replace another's centre would no longer
-- match its own rows).
CREATE FUNCTION nvembed_search_index_sql(tbl regclass, column_name name, type_name name, dimensions integer,
                                         centred boolean, build_concurrently boolean)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    existing regclass;
    estimated_rows double precision;
    sample text := '';
    mean text;
    table_schema name;
    base_name text;
    centre_name text;
    suffix integer := 1;
    centre regprocedure;
BEGIN
    IF centred IS NULL OR build_concurrently IS NULL THEN
        RAISE EXCEPTION 'centred and build_concurrently must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF build_concurrently AND (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) = 'p' THEN
        RAISE EXCEPTION 'PostgreSQL cannot build an index of a partitioned table concurrently' USING ERRCODE = 'feature_not_supported',
            HINT = 'Build it without build_concurrently; or, as PostgreSQL documents for partitioned tables, CREATE INDEX ON ONLY the table, the same index CONCURRENTLY on each partition, then ALTER INDEX ... ATTACH PARTITION each (nvembed_search uses the table''s index once all are attached).';
    END IF;
    SELECT s.index INTO existing FROM @extschema@.nvembed_search_index(tbl, column_name, dimensions) s LIMIT 1;
    IF existing IS NOT NULL THEN
        RAISE EXCEPTION 'column % of % already has a search index, %', quote_ident(column_name), tbl, existing
            USING ERRCODE = 'duplicate_object', HINT = format('To make it again (another kind, or centred on the column''s current mean), DROP INDEX %s first.', existing);
    END IF;
    IF centred THEN
        -- reltuples of the table and of its partitions or inheritance children (a partitioned
        -- table's own is -1), all of which the mean is taken over.
        WITH RECURSIVE tree(oid) AS (SELECT tbl::oid UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
        SELECT sum(c.reltuples) FILTER (WHERE c.reltuples > 0) INTO estimated_rows FROM pg_class c JOIN tree USING (oid);
        IF estimated_rows > @extschema@.nvembed_search_centre_sample_rows() THEN
            sample := format(' TABLESAMPLE BERNOULLI (%s) REPEATABLE (0)',
                             100.0 * @extschema@.nvembed_search_centre_sample_rows() / estimated_rows);
        END IF;
        EXECUTE format('SELECT %I.avg(t.%I)::text FROM %s t%s WHERE t.%I IS NOT NULL',
                       vector_schema, column_name, tbl, sample, column_name)
            INTO mean;
        IF mean IS NULL THEN
            RAISE EXCEPTION 'column % of % has no vectors yet to centre an index on', quote_ident(column_name), tbl
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Create the index once some rows are embedded (the mean of a few thousand is enough), or leave centred false.';
        END IF;
        SELECT n.nspname, c.relname || '_' || column_name || '_centre' INTO table_schema, base_name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
        IF octet_length(base_name) > 55 THEN -- NAMEDATALEN - 1, less room for a number
            base_name := 'centre_' || md5(tbl::text || '.' || column_name);
        END IF;
        centre_name := base_name;
        WHILE to_regprocedure(format('%I.%I()', table_schema, centre_name)) IS NOT NULL LOOP
            suffix := suffix + 1;
            centre_name := base_name || '_' || suffix;
        END LOOP;
        EXECUTE format('CREATE FUNCTION %1$I.%2$I() RETURNS %3$I.%4$I(%5$s) LANGUAGE sql IMMUTABLE PARALLEL SAFE '
                       'RETURN %6$L::%3$I.%4$I(%5$s)',
                       table_schema, centre_name, vector_schema, type_name, dimensions, mean);
        centre := format('%I.%I()', table_schema, centre_name)::regprocedure;
        -- Every role that writes the table evaluates the index expression.
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', centre);
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', centre,
                       format('The mean of %s.%I when its nvembed search index was made: the centre of the index''s sign bits. Drop it with that index.',
                              tbl, column_name));
    END IF;
    RETURN format('CREATE INDEX%s ON %s USING hnsw ((%s) %I.bit_hamming_ops)',
                  CASE WHEN build_concurrently THEN ' CONCURRENTLY' ELSE '' END, tbl,
                  @extschema@.nvembed_search_index_expression(column_name, dimensions, @extschema@.nvembed_search_centre_call(centre)),
                  vector_schema);
END;
$$;

-- The CREATE INDEX statement nvembed_create_search_index runs, for running it yourself
-- (CONCURRENTLY, with other HNSW parameters, in a maintenance window); a centred one's centre
-- function is made now.
CREATE FUNCTION nvembed_search_index_statement(tbl regclass, column_name name DEFAULT NULL, centred boolean DEFAULT false,
                                               build_concurrently boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record := @extschema@.nvembed_search_column(tbl, column_name, true);
BEGIN
    RETURN @extschema@.nvembed_search_index_sql(tbl, col.column_name, col.type_name, col.dimensions, centred, build_concurrently);
END;
$$;

-- One call: the search index of a column nvembed fills (NULL: the table's one vector column),
-- built now; returns the index. Rows written later are indexed as they are written.
CREATE FUNCTION nvembed_create_search_index(tbl regclass, column_name name DEFAULT NULL, centred boolean DEFAULT false)
RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record := @extschema@.nvembed_search_column(tbl, column_name, true);
BEGIN
    -- Self-conflicting, and no more than CREATE INDEX blocks (writes): a second call waits, then
    -- finds the first one's index. (A materialized view cannot be locked so; only REFRESH writes it.)
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) <> 'm' THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
    END IF;
    EXECUTE @extschema@.nvembed_search_index_sql(tbl, col.column_name, col.type_name, col.dimensions, centred, false);
    RETURN (SELECT s.index FROM @extschema@.nvembed_search_index(tbl, col.column_name, col.dimensions) s LIMIT 1);
END;
$$;

-- Table `tbl`'s name, schema-qualified and quoted, as the statements of a search name it.
CREATE FUNCTION nvembed_search_relation(tbl regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = tbl);

-- The k rows of source's table nearest to `query` (a vector, or an array of the model's
-- dimension), best first, with their inner product (= cosine: the vectors are unit length).
-- `source` is any value of the table's row type, NULL::docs for instance: the rows come back as
-- that type. `filter` is a condition on the table's columns, applied before the limit. Uses the
-- column's search index when there is one (nvembed_create_search_index): `candidates` rows by
-- Hamming distance, re-ranked exactly; without one, or if fewer than k of the rows the index
-- scan reached pass the filter, the exact scan.
-- The best rows are found first as (tableoid, ctid, distance) arrays, and only those k rows are
-- then read whole (a 4,096-dim vector is 16 KB of TOAST to read again); STABLE, so both
-- statements see the caller's snapshot and a position still names the same row. No CTE or alias
-- of nvembed's own stands between the filter and the table: the filter may name the table, and a
-- table of the caller's named like one of nvembed's CTEs would otherwise be hidden by it. The
-- filter is the one argument of nvembed_search_condition, on lines of its own, so it stays one
-- expression (a top-level comma is an error, a -- comment ends with its line).
-- The hnsw settings it changes for its scan are the caller's again when it returns.
CREATE FUNCTION nvembed_search(source anyelement, query real[], k integer DEFAULT 10, filter text DEFAULT NULL,
                               column_name name DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, score double precision)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    tbl pg_catalog.regclass := (SELECT t.typrelid FROM pg_catalog.pg_type t
                                WHERE t.oid OPERATOR(pg_catalog.=) pg_catalog.pg_typeof(source)
                                  AND t.typrelid OPERATOR(pg_catalog.<>) 0);
    col record;
    vector_schema pg_catalog.name := @extschema@.nvembed_search_vector_schema();
    index record;
    relation pg_catalog.text;
    typed_query pg_catalog.text;
    query_bits pg_catalog.text;
    wanted integer;
    condition pg_catalog.text;
    -- The best rows of a query for (rel, row_id, distance, passed) as arrays, in distance order.
    best_of pg_catalog.text := 'SELECT pg_catalog.array_agg(b.rel ORDER BY b.distance, b.rel, b.row_id),'
        '       pg_catalog.array_agg(b.row_id ORDER BY b.distance, b.rel, b.row_id),'
        '       pg_catalog.array_agg(b.distance ORDER BY b.distance, b.rel, b.row_id), pg_catalog.max(b.passed)'
        ' FROM (%s) b';
    rels pg_catalog.oid[];
    row_ids pg_catalog.tid[];
    distances double precision[];
    passed bigint;
    saved_ef_search pg_catalog.text;
    saved_iterative_scan pg_catalog.text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'nvembed_search: source must be a row of the table to search, not a value of type %', pg_catalog.pg_typeof(source)
            USING ERRCODE = 'wrong_object_type', HINT = 'Pass the table''s row type: nvembed_search(NULL::docs, ...).';
    END IF;
    IF k IS NULL OR k OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'nvembed_search: k must be at least 1, not %', COALESCE(k::pg_catalog.text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    wanted := COALESCE(candidates, @extschema@.nvembed_search_default_candidates(k));
    IF wanted OPERATOR(pg_catalog.<) k THEN
        RAISE EXCEPTION 'nvembed_search: candidates (%) must be at least k (%)', wanted, k USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Leave candidates NULL for the default, 10 × k and at least 200.';
    END IF;
    col := @extschema@.nvembed_search_column(tbl, column_name, false);
    IF query IS NULL THEN
        RETURN;
    END IF;
    IF pg_catalog.cardinality(query) OPERATOR(pg_catalog.<>) col.dimensions THEN
        RAISE EXCEPTION 'nvembed_search: the query vector has % dimensions, column % of % has %', pg_catalog.cardinality(query),
            pg_catalog.quote_ident(col.column_name), tbl, col.dimensions
            USING ERRCODE = 'data_exception', HINT = 'Embed the query with the model that filled the column.';
    END IF;
    -- Qualified, so that nothing of the caller's (a CTE in a filter, a table earlier in
    -- search_path) can stand for it; unaliased, so that the filter may name it.
    relation := @extschema@.nvembed_search_relation(tbl);
    typed_query := pg_catalog.format('$1::%I.%I', vector_schema, col.type_name);
    condition := pg_catalog.format(E'%1$s.%2$I IS NOT NULL AND @extschema@.nvembed_search_condition((\n%3$s\n))',
                                   relation, col.column_name, COALESCE(filter, 'true'));
    -- The query cast by pgvector, which loads its library: its hnsw settings exist from here on.
    EXECUTE pg_catalog.format('SELECT %s IS NULL', typed_query) USING query;
    SELECT s.index, s.expression, s.centre INTO index
    FROM @extschema@.nvembed_search_index(tbl, col.column_name, col.dimensions) s LIMIT 1;
    IF index.index IS NOT NULL THEN
        query_bits := pg_catalog.format(CASE WHEN index.centre IS NULL THEN '(SELECT %1$I.binary_quantize(%2$s)::pg_catalog.varbit)'
                                             ELSE '(SELECT %1$I.binary_quantize(%2$s OPERATOR(%1$I.-) %3$s)::pg_catalog.varbit)' END,
                                        vector_schema, typed_query, index.centre);
        -- An HNSW scan stops after hnsw.ef_search rows (at most 1,000) unless iterative scans
        -- (pgvector 0.8.0) carry it on. Both are set with set_config(..., true), which lasts
        -- to the end of the transaction, and put back right after the statement.
        saved_ef_search := pg_catalog.current_setting('hnsw.ef_search', true);
        saved_iterative_scan := pg_catalog.current_setting('hnsw.iterative_scan', true);
        PERFORM pg_catalog.set_config('hnsw.ef_search', pg_catalog.int4smaller(wanted, 1000)::pg_catalog.text, true);
        IF saved_iterative_scan IS NOT NULL THEN
            PERFORM pg_catalog.set_config('hnsw.iterative_scan', 'relaxed_order', true);
        END IF;
        EXECUTE pg_catalog.format(best_of, pg_catalog.format(
            'SELECT c.rel, c.row_id, c.v OPERATOR(%1$I.<#>) %2$s AS distance, pg_catalog.count(*) OVER () AS passed'
            ' FROM (SELECT %3$s.tableoid AS rel, %3$s.ctid AS row_id, %3$s.%4$I AS v FROM %3$s WHERE %5$s'
            '       ORDER BY %6$s OPERATOR(%1$I.<~>) %7$s LIMIT $3) c'
            ' ORDER BY c.v OPERATOR(%1$I.<#>) %2$s LIMIT $2',
            vector_schema, typed_query, relation, col.column_name, condition,
            index.expression, query_bits))
            INTO rels, row_ids, distances, passed USING query, k, wanted;
        PERFORM pg_catalog.set_config('hnsw.ef_search', saved_ef_search, true);
        IF saved_iterative_scan IS NOT NULL THEN
            PERFORM pg_catalog.set_config('hnsw.iterative_scan', saved_iterative_scan, true);
        END IF;
    END IF;
    -- No index, or the filter passed fewer than k of the rows the index scan reached (or the
    -- table has fewer): every row the filter passes, exactly. (`+ 0`: an ordinary HNSW or
    -- IVFFlat index of the column, which would answer ORDER BY <#> approximately, cannot.)
    IF COALESCE(passed, 0) OPERATOR(pg_catalog.<) k THEN
        EXECUTE pg_catalog.format(best_of, pg_catalog.format(
            'SELECT %3$s.tableoid AS rel, %3$s.ctid AS row_id,'
            '       (%3$s.%4$I OPERATOR(%1$I.<#>) %2$s) OPERATOR(pg_catalog.+) 0 AS distance, NULL::pg_catalog.int8 AS passed'
            ' FROM %3$s WHERE %5$s ORDER BY distance LIMIT $2',
            vector_schema, typed_query, relation, col.column_name, condition))
            INTO rels, row_ids, distances, passed USING query, k;
    END IF;
    -- The rows themselves: ROW(t.*), not t, which would be a column of that name if the table
    -- has one.
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT ROW(t.*)::%1$s, OPERATOR(pg_catalog.-) b.distance'
        ' FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3)) WITH ORDINALITY AS b(rel, row_id, distance, n)'
        ' JOIN %2$s AS t ON t.tableoid OPERATOR(pg_catalog.=) b.rel AND t.ctid OPERATOR(pg_catalog.=) b.row_id ORDER BY b.n',
        pg_catalog.pg_typeof(source), relation)
        USING rels, row_ids, distances;
END;
$$;

-- The same, for a query text: embedded with the session's nvembed.query_instruction.
CREATE FUNCTION nvembed_search(source anyelement, query text, k integer DEFAULT 10, filter text DEFAULT NULL,
                               column_name name DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, score double precision)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN QUERY SELECT s.item, s.score
                 FROM @extschema@.nvembed_search(source, @extschema@.nvembed_query(query), k, filter, column_name, candidates) s;
END;
$$;

-- The chunk table nvembed_search_documents searches for the rows of `tbl`: that of its chunk
-- vectorizer, or `requested` (which must be one of its chunk vectorizers' tables).
CREATE FUNCTION nvembed_search_chunk_table(tbl regclass, requested regclass) RETURNS regclass
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found integer;
    chunk_table regclass;
BEGIN
    SELECT count(*), min(v.chunk_table::oid)::regclass INTO found, chunk_table
    FROM @extschema@.nvembed_vectorizer v
    WHERE v.tbl = $1 AND v.chunk_table IS NOT NULL AND (requested IS NULL OR v.chunk_table = requested);
    IF found = 0 THEN
        RAISE EXCEPTION 'nvembed_search_documents: %', CASE WHEN requested IS NULL THEN format('no chunk vectorizer fills a chunk table of %s', tbl)
                                                            ELSE format('%s is not a chunk table of %s', requested, tbl) END
            USING ERRCODE = 'undefined_object',
                  HINT = format('nvembed_create_chunk_vectorizer(%L, ...) makes one; nvembed_search searches a table of its own vectors.', tbl);
    ELSIF found > 1 THEN
        RAISE EXCEPTION 'nvembed_search_documents: % has % chunk tables', tbl, found
            USING ERRCODE = 'ambiguous_parameter',
                  HINT = 'Name one: chunk_table => ''...''. SELECT chunk_table FROM nvembed_vectorizer_status lists them.';
    END IF;
    RETURN chunk_table;
END;
$$;

-- Searches the rows of a table by their chunks (a chunk vectorizer's table): nvembed_search over
-- the chunks, then each row's best chunk. Returns the k rows whose best chunks score highest,
-- best first, each with that chunk, its number and its score. `filter` is a condition on the
-- rows themselves (as in nvembed_search; it may name the table). Fewer than k rows' chunks among
-- the best ones (a row's chunks crowd the others out, or rows the caller may not see) fetch four
-- times as many chunks, until k rows have one or no more chunks pass.
CREATE FUNCTION nvembed_search_documents(source anyelement, query real[], k integer DEFAULT 10, filter text DEFAULT NULL,
                                         chunk_table regclass DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, chunk text, chunk_seq integer, score double precision)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    tbl pg_catalog.regclass := (SELECT t.typrelid FROM pg_catalog.pg_type t
                                WHERE t.oid OPERATOR(pg_catalog.=) pg_catalog.pg_typeof(source)
                                  AND t.typrelid OPERATOR(pg_catalog.<>) 0);
    chunks pg_catalog.regclass;
    relation pg_catalog.text;
    chunk_relation pg_catalog.text;
    keys_of_item pg_catalog.text;
    rows_match pg_catalog.text;
    chunks_match pg_catalog.text;
    condition pg_catalog.text;
    wanted integer;
    found bigint;
    rows_found bigint;
    rels pg_catalog.oid[];
    row_ids pg_catalog.tid[];
    texts pg_catalog.text[];
    seqs integer[];
    scores double precision[];
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'nvembed_search_documents: source must be a row of the table to search, not a value of type %', pg_catalog.pg_typeof(source)
            USING ERRCODE = 'wrong_object_type', HINT = 'Pass the table''s row type: nvembed_search_documents(NULL::docs, ...).';
    END IF;
    IF k IS NULL OR k OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'nvembed_search_documents: k must be at least 1, not %', COALESCE(k::pg_catalog.text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    chunks := @extschema@.nvembed_search_chunk_table(tbl, chunk_table);
    relation := @extschema@.nvembed_search_relation(tbl);
    chunk_relation := @extschema@.nvembed_search_relation(chunks);
    SELECT pg_catalog.string_agg(pg_catalog.format('(f.item).%I', key_part.chunk_column), ', ' ORDER BY key_part.key_position),
           pg_catalog.string_agg(pg_catalog.format('t.%I %s (b.item).%I', key_part.column_name, key_part.equals, key_part.chunk_column),
                                 ' AND ' ORDER BY key_part.key_position),
           pg_catalog.string_agg(pg_catalog.format('%s.%I %s %s.%I', relation, key_part.column_name, key_part.equals, chunk_relation,
                                                   key_part.chunk_column),
                                 ' AND ' ORDER BY key_part.key_position)
    INTO keys_of_item, rows_match, chunks_match
    FROM @extschema@.nvembed_vectorizer_chunk_key(chunks, tbl) key_part;
    IF keys_of_item IS NULL THEN
        RAISE EXCEPTION 'nvembed_search_documents: % has no foreign key to the primary key of %', chunks, tbl
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Drop the chunk table and create the chunk vectorizer again.';
    END IF;
    -- The filter is the rows': evaluated for each chunk on its row (the table unaliased, so the
    -- filter may name it; its columns before the chunk table's).
    condition := CASE WHEN filter IS NOT NULL
                      THEN pg_catalog.format(E'EXISTS (SELECT FROM %s WHERE %s AND @extschema@.nvembed_search_condition((\n%s\n)))',
                                             relation, chunks_match, filter) END;
    wanted := pg_catalog.int4smaller(k, 2147483647 / 4) OPERATOR(pg_catalog.*) 4;
    LOOP
        -- Each row's best chunk among those found, for the rows the caller sees.
        EXECUTE pg_catalog.format(
            'WITH found AS MATERIALIZED (SELECT s.item, s.score FROM @extschema@.nvembed_search(NULL::%1$s, $1, $2, $3, ''embedding'', $4) s),
                  best AS (SELECT DISTINCT ON (%2$s) f.item, f.score FROM found f ORDER BY %2$s, f.score DESC, (f.item).chunk_seq),
                  seen AS MATERIALIZED (SELECT b.item, b.score, t.tableoid AS rel, t.ctid AS row_id FROM best b JOIN %3$s t ON %4$s),
                  top AS (SELECT * FROM seen ORDER BY seen.score DESC, (seen.item).chunk_seq LIMIT $5)
             SELECT (SELECT pg_catalog.count(*) FROM found), (SELECT pg_catalog.count(*) FROM seen),
                    pg_catalog.array_agg(top.rel ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg(top.row_id ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg((top.item).chunk ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg((top.item).chunk_seq ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg(top.score ORDER BY top.score DESC, (top.item).chunk_seq)
             FROM top',
            chunks, keys_of_item, relation, rows_match)
            INTO found, rows_found, rels, row_ids, texts, seqs, scores
            USING query, wanted, condition, pg_catalog.int4larger(candidates, wanted), k;
        EXIT WHEN rows_found OPERATOR(pg_catalog.>=) k OR found OPERATOR(pg_catalog.<) wanted
                  OR wanted OPERATOR(pg_catalog.>) 2147483647 / 4;
        wanted := wanted OPERATOR(pg_catalog.*) 4;
    END LOOP;
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT ROW(t.*)::%1$s, b.chunk, b.chunk_seq, b.score'
        ' FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5))'
        '      WITH ORDINALITY AS b(rel, row_id, chunk, chunk_seq, score, n)'
        ' JOIN %2$s AS t ON t.tableoid OPERATOR(pg_catalog.=) b.rel AND t.ctid OPERATOR(pg_catalog.=) b.row_id ORDER BY b.n',
        pg_catalog.pg_typeof(source), relation)
        USING rels, row_ids, texts, seqs, scores;
END;
$$;

-- The same, for a query text: embedded with the session's nvembed.query_instruction.
CREATE FUNCTION nvembed_search_documents(source anyelement, query text, k integer DEFAULT 10, filter text DEFAULT NULL,
                                         chunk_table regclass DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, chunk text, chunk_seq integer, score double precision)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN QUERY SELECT s.item, s.chunk, s.chunk_seq, s.score
                 FROM @extschema@.nvembed_search_documents(source, @extschema@.nvembed_query(query), k, filter, chunk_table, candidates) s;
END;
$$;
