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

CREATE PROCEDURE nvembed_backfill(tbl regclass, source_column text, target_column text,
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
