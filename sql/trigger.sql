-- nvembed_embed_trigger(source_column, target_column [, 'passage' | 'query'])
--
-- BEFORE INSERT OR UPDATE ... FOR EACH ROW: fills target_column with the embedding of
-- source_column. On UPDATE it re-embeds only when the source text changed. NULL text gives a
-- NULL embedding. The target may be vector(N), halfvec(N) or real[]: the value is assigned
-- through the column type's own input, exactly as an INSERT of the array would be.
CREATE FUNCTION nvembed_embed_trigger() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    source_column text := TG_ARGV[0];
    target_column text := TG_ARGV[1];
    kind text := coalesce(TG_ARGV[2], 'passage');
    new_row jsonb;
    source_text text;
    embedding real[];
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
    new_row := to_jsonb(NEW);
    IF TG_OP = 'UPDATE' AND new_row -> source_column IS NOT DISTINCT FROM to_jsonb(OLD) -> source_column THEN
        RETURN NEW;
    END IF;
    source_text := new_row ->> source_column;
    IF source_text IS NULL THEN
        embedding := NULL;
    ELSIF kind = 'query' THEN
        embedding := @extschema@.nvembed_query(source_text);
    ELSE
        embedding := @extschema@.nvembed_passage(source_text);
    END IF;
    RETURN jsonb_populate_record(NEW, jsonb_build_object(target_column, to_jsonb(embedding)));
END;
$$;
