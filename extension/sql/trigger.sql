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
