-- CALL nvembed_backfill(tbl, source_column, target_column [, kind [, batch_size]])
--
-- Embeds every row whose target is NULL and whose source is not, batch_size rows per model
-- round trip, committing after each batch: an interrupted run loses at most one batch, and a
-- re-run continues where it stopped.
--
-- Rows are identified by (tableoid, ctid), not by ctid alone (unique only inside one partition
-- or inheritance child) and not by primary key (tables without one must work too, and a key may
-- span several columns of any type). Within one batch's transaction a claimed row is locked, so
-- its (tableoid, ctid) cannot change between the claim and the write.
--
-- One batch (nvembed_backfill_batch) runs in four steps inside one transaction:
--   1. read the next batch_size rows after the previous batch, in (tableoid, ctid) order,
--      WITHOUT locking them: the model call that follows takes seconds per row with the real
--      model, and holding row locks that long would stall the application's UPDATEs;
--   2. embed their texts in one model round trip;
--   3. claim the rows whose source is still byte-for-byte the text that was embedded and whose
--      target is still NULL, FOR UPDATE SKIP LOCKED (rows another session holds are skipped and
--      counted, never waited for);
--   4. write the claimed rows, re-checking the text again in the UPDATE's WHERE.
-- A row whose text changed after step 1 is therefore left NULL for the next run. Each run visits
-- each row at most once (the (tableoid, ctid) cursor only moves forward), so rows that cannot be
-- written (locked, changed, hidden by row-level security, cancelled by a trigger) never make it
-- loop. Concurrent runs on the same table take turns batch by batch (a transaction-level
-- advisory lock), so no text is embedded twice and nothing is left locked after a cancel.

-- One batch of nvembed_backfill: the rows after (after_rel, after_row). Returns how many rows it
-- read, embedded, skipped because another session held them locked, and left because they changed
-- (text changed, row deleted, target filled, or the UPDATE was refused by a policy or trigger),
-- and the position of its last row for the next call. A plain function, so it can pin
-- search_path; the caller commits.
CREATE FUNCTION nvembed_backfill_batch(
    tbl regclass, source_column text, target_column text, kind text, batch_size integer,
    after_rel oid, after_row tid,
    OUT read integer, OUT embedded integer, OUT locked integer, OUT changed integer,
    OUT last_rel oid, OUT last_row tid)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Advisory lock class of nvembed_backfill ('nvbf'); the second key is the table.
    backfill_lock_class CONSTANT integer := 1853252198;
    embed_call text;
    rels oid[];
    row_ids tid[];
    texts text[];
    vectors real[]; -- two-dimensional: one row per text, in batch order
    claimed_rels oid[];
    claimed_rows tid[];
    claimed_n bigint[];
    still_matching integer;
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
    PERFORM pg_advisory_xact_lock(backfill_lock_class, tbl::oid::integer);

    EXECUTE format(
        'SELECT array_agg(tableoid ORDER BY tableoid, ctid), array_agg(ctid ORDER BY tableoid, ctid),
                array_agg(src ORDER BY tableoid, ctid)
         FROM (SELECT tableoid, ctid, %1$I::text AS src FROM %2$s
               WHERE %3$I IS NULL AND %1$I IS NOT NULL AND (tableoid, ctid) > ($1, $2)
               ORDER BY tableoid, ctid LIMIT $3) batch',
        source_column, tbl, target_column)
        INTO rels, row_ids, texts USING after_rel, after_row, batch_size;
    read := coalesce(cardinality(rels), 0);
    embedded := 0; locked := 0; changed := 0;
    IF read = 0 THEN
        RETURN;
    END IF;
    last_rel := rels[read];
    last_row := row_ids[read];

    EXECUTE format('SELECT array_agg(e ORDER BY n) FROM %s($1) WITH ORDINALITY AS v(e, n)', embed_call)
        INTO vectors USING texts;

    EXECUTE format(
        'WITH b AS (SELECT * FROM unnest($1::oid[], $2::tid[], $3::text[]) WITH ORDINALITY AS b(rel, row_id, src, n)),
              matching AS (SELECT 1 FROM %1$s AS t JOIN b ON t.tableoid = b.rel AND t.ctid = b.row_id WHERE %2$s),
              claimed AS (SELECT t.tableoid AS rel, t.ctid AS row_id, b.n
                          FROM %1$s AS t JOIN b ON t.tableoid = b.rel AND t.ctid = b.row_id WHERE %2$s
                          FOR UPDATE OF t SKIP LOCKED)
         SELECT (SELECT count(*) FROM matching), array_agg(rel), array_agg(row_id), array_agg(n) FROM claimed',
        tbl, unchanged)
        INTO still_matching, claimed_rels, claimed_rows, claimed_n USING rels, row_ids, texts;
    locked := still_matching - coalesce(cardinality(claimed_n), 0);

    IF claimed_n IS NOT NULL THEN
        EXECUTE format(
            'UPDATE %1$s AS t SET %2$I = ARRAY(SELECT unnest($4[b.n:b.n][:]))
             FROM (SELECT c.rel, c.row_id, c.n::integer AS n, $5[c.n] AS src
                   FROM unnest($1::oid[], $2::tid[], $3::bigint[]) AS c(rel, row_id, n)) b
             WHERE t.tableoid = b.rel AND t.ctid = b.row_id AND %3$s',
            tbl, target_column, unchanged)
            USING claimed_rels, claimed_rows, claimed_n, vectors, texts;
        GET DIAGNOSTICS embedded = ROW_COUNT;
    END IF;
    changed := read - embedded - locked;
END;
$$;

CREATE PROCEDURE nvembed_backfill(tbl regclass, source_column text, target_column text,
                                  kind text DEFAULT 'passage', batch_size integer DEFAULT 64)
LANGUAGE plpgsql
-- SECURITY INVOKER: it writes only what the calling role could write itself. A procedure that
-- COMMITs cannot carry a SET search_path clause, so every function and operator below is
-- schema-qualified (an unqualified operator on mixed types would run whatever a role put first
-- in the caller's search_path: CVE-2018-1058); the batch function pins its own search_path.
AS $$
DECLARE
    progress_interval CONSTANT interval := '2 s';
    pending_query text;
    total bigint;
    read bigint := 0;
    embedded bigint := 0;
    locked bigint := 0;
    changed bigint := 0;
    started timestamptz := pg_catalog.clock_timestamp();
    last_notice timestamptz := started;
    elapsed double precision;
    batch record;
    cursor_rel oid := 0;
    cursor_row tid := '(0,0)';
    column_name text;
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
    pending_query := pg_catalog.format('SELECT pg_catalog.count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL',
                                       tbl, target_column, source_column);
    EXECUTE pending_query INTO total;
    LOOP
        SELECT * INTO batch FROM @extschema@.nvembed_backfill_batch(
            tbl, source_column, target_column, kind, batch_size, cursor_rel, cursor_row);
        EXIT WHEN batch.read OPERATOR(pg_catalog.=) 0;
        COMMIT;
        read := read OPERATOR(pg_catalog.+) batch.read;
        embedded := embedded OPERATOR(pg_catalog.+) batch.embedded;
        locked := locked OPERATOR(pg_catalog.+) batch.locked;
        changed := changed OPERATOR(pg_catalog.+) batch.changed;
        cursor_rel := batch.last_rel;
        cursor_row := batch.last_row;
        IF pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) last_notice OPERATOR(pg_catalog.>=) progress_interval THEN
            last_notice := pg_catalog.clock_timestamp();
            elapsed := pg_catalog.date_part('epoch', last_notice OPERATOR(pg_catalog.-) started);
            RAISE NOTICE 'nvembed_backfill: % of % rows read, % embedded, % rows/s, ETA % s', read, total, embedded,
                pg_catalog.round((embedded::double precision OPERATOR(pg_catalog./) elapsed)::numeric, 1),
                pg_catalog.round((GREATEST(total OPERATOR(pg_catalog.-) read, 0::bigint)::double precision
                                  OPERATOR(pg_catalog.*) elapsed OPERATOR(pg_catalog./) read::double precision)::numeric, 0);
        END IF;
    END LOOP;
    EXECUTE pending_query INTO total;
    elapsed := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) started);
    RAISE NOTICE 'nvembed_backfill: done in % s: % rows embedded, % skipped (locked by another session), % skipped (changed since read); % rows still have a NULL %',
        pg_catalog.round(elapsed::numeric, 1), embedded, locked, changed, total, pg_catalog.quote_ident(target_column);
END;
$$;
