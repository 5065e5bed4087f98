-- CALL nvembed_backfill(tbl, source_column, target_column [, kind [, batch_size]])
--
-- Embeds every row whose target is NULL and whose source is not, batch_size rows per model
-- round trip, committing after each batch: an interrupted run loses at most one batch, and a
-- re-run continues where it stopped (rows already embedded are skipped; rows another run is
-- working on are skipped too, FOR UPDATE SKIP LOCKED). Progress goes out as NOTICEs.
--
-- SECURITY INVOKER: it writes only what the calling role could write itself. It cannot carry
-- a SET search_path clause (that forbids COMMIT in a procedure), so every name it uses is
-- schema-qualified and the table is passed as a regclass.
CREATE PROCEDURE nvembed_backfill(tbl regclass, source_column text, target_column text,
                                  kind text DEFAULT 'passage', batch_size integer DEFAULT 64)
LANGUAGE plpgsql
AS $$
DECLARE
    total bigint;
    done bigint := 0;
    started timestamptz := pg_catalog.clock_timestamp();
    elapsed double precision;
    row_ids tid[];
    texts text[];
    embed_call text;
BEGIN
    IF kind IS NULL OR kind NOT IN ('passage', 'query') THEN
        RAISE EXCEPTION 'nvembed_backfill: kind must be ''passage'' or ''query'', not %', pg_catalog.quote_nullable(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'nvembed_backfill: batch_size must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH embed_call IN ARRAY ARRAY[source_column, target_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                       WHERE attrelid = tbl AND attname = embed_call AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'column "%" of relation % does not exist', embed_call, tbl
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;
    embed_call := CASE kind WHEN 'query' THEN '@extschema@.nvembed_queries' ELSE '@extschema@.nvembed_passages' END;
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL',
                              tbl, target_column, source_column) INTO total;
    LOOP
        EXECUTE pg_catalog.format(
            'SELECT pg_catalog.array_agg(ctid), pg_catalog.array_agg(src) FROM (
                 SELECT ctid, %I::pg_catalog.text AS src FROM %s
                 WHERE %I IS NULL AND %I IS NOT NULL LIMIT %s FOR UPDATE SKIP LOCKED) batch',
            source_column, tbl, target_column, source_column, batch_size) INTO row_ids, texts;
        EXIT WHEN row_ids IS NULL;
        -- One round trip to the model for the whole batch, matched back to rows by position.
        EXECUTE pg_catalog.format(
            'UPDATE %s AS t SET %I = e.embedding
             FROM (SELECT r.row_id, v.embedding
                   FROM pg_catalog.unnest($1::pg_catalog.tid[]) WITH ORDINALITY AS r(row_id, n)
                   JOIN %s($2) WITH ORDINALITY AS v(embedding, n) USING (n)) e
             WHERE t.ctid OPERATOR(pg_catalog.=) e.row_id',
            tbl, target_column, embed_call) USING row_ids, texts;
        done := done + pg_catalog.cardinality(row_ids);
        COMMIT;
        elapsed := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - started);
        RAISE NOTICE 'nvembed_backfill: % / % rows, % rows/s, ETA % s', done, total,
            pg_catalog.round((done / GREATEST(elapsed, 1e-6))::numeric, 1),
            pg_catalog.round((GREATEST(total - done, 0) * elapsed / done)::numeric, 1);
    END LOOP;
    elapsed := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - started);
    RAISE NOTICE 'nvembed_backfill: done, % rows embedded in % s (% rows/s)', done,
        pg_catalog.round(elapsed::numeric, 2), pg_catalog.round((done / GREATEST(elapsed, 1e-6))::numeric, 1);
END;
$$;
