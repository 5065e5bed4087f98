-- The public embedding functions. Texts travel to the model as UTF-8 whatever the database
-- encoding (convert_to), so results are the same in a LATIN1 database as in a UTF8 one.
-- STABLE (the model is configuration, so not IMMUTABLE), and plain SQL so the planner inlines
-- them; every name is schema-qualified instead of pinning search_path (a SET clause would
-- prevent inlining). The one-text functions are STRICT (NULL in, NULL out). The set-returning
-- ones are not: PostgreSQL inlines a set-returning function in FROM only if it is not STRICT,
-- and one it does not inline is run to its end before the first row is returned (a LIMIT or a
-- cursor's first FETCH would wait for every vector). They call the STRICT nvembed_embed_many_utf8,
-- so a NULL array or instruction still gives no rows.

-- Embedding of one text with any instruction prefix; the one place texts are converted.
CREATE FUNCTION nvembed_embed(text, instruction text) RETURNS real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN @extschema@.nvembed_embed_utf8(pg_catalog.convert_to($1, 'UTF8'), pg_catalog.convert_to(instruction, 'UTF8'));

-- Many texts with any instruction, in one round trip to the model: one row per input, in input
-- order, NULL for NULL.
CREATE FUNCTION nvembed_embed_many(texts text[], instruction text) RETURNS SETOF real[]
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT @extschema@.nvembed_embed_many_utf8(
        ARRAY(SELECT pg_catalog.convert_to(t, 'UTF8') FROM pg_catalog.unnest(texts) WITH ORDINALITY AS u(t, n) ORDER BY n),
        pg_catalog.convert_to(instruction, 'UTF8'));
END;

-- Query embedding with the session's nvembed.query_instruction.
CREATE FUNCTION nvembed_query(text) RETURNS real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN @extschema@.nvembed_embed($1, pg_catalog.current_setting('nvembed.query_instruction'));

-- Query embedding for a custom retrieval task.
CREATE FUNCTION nvembed_query(text, task text) RETURNS real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN @extschema@.nvembed_embed($1, @extschema@.nvembed_task_instruction(task));

-- Passage embedding (no instruction).
CREATE FUNCTION nvembed_passage(text) RETURNS real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN @extschema@.nvembed_embed($1, '');

CREATE FUNCTION nvembed_passages(texts text[]) RETURNS SETOF real[]
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT @extschema@.nvembed_embed_many(texts, '');
END;

CREATE FUNCTION nvembed_queries(texts text[]) RETURNS SETOF real[]
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT @extschema@.nvembed_embed_many(texts, pg_catalog.current_setting('nvembed.query_instruction'));
END;

CREATE FUNCTION nvembed_queries(texts text[], task text) RETURNS SETOF real[]
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT @extschema@.nvembed_embed_many(texts, @extschema@.nvembed_task_instruction(task));
END;
