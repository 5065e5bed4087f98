-- nvembed_embed_trigger(source_column, target_column [, 'passage' | 'query'])
--
-- BEFORE INSERT OR UPDATE ... FOR EACH ROW (on a plain table, or on a partitioned parent, where
-- it fires for rows routed to any partition). Rules:
--   INSERT  a non-NULL target is kept (COPY of precomputed vectors, pg_restore --data-only,
--           logical replication with ENABLE ALWAYS); a NULL target gets the source's embedding.
--   UPDATE  the source changed: re-embed, unless the same statement also set the target to
--           another non-NULL vector (writing back the old vector, as ORMs do, or NULL re-embeds);
--           the source is unchanged: a NULL target is filled, any other target is kept.
-- A NULL source gives a NULL embedding. Only the two named columns are read, and only the
-- target is written: the row is never converted as a whole (a 4096-float vector is ~50 KB of
-- text). The target may be vector(N), halfvec(N) or real[]: the value is assigned through the
-- column type's own input, exactly as an INSERT of the array would be.
CREATE FUNCTION nvembed_embed_trigger() RETURNS trigger
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
