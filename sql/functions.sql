-- The public embedding functions. Texts travel to the model as UTF-8 whatever the database
-- encoding (convert_to), so results are the same in a LATIN1 database as in a UTF8 one.
-- STRICT (NULL in, NULL out), STABLE (the model is configuration, so not IMMUTABLE), and plain
-- SQL so the planner inlines them; every name is schema-qualified instead of pinning
-- search_path (a SET clause would prevent inlining).

-- Query embedding with the session's nvembed.query_instruction.
CREATE FUNCTION nvembed_query(text) RETURNS real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN @extschema@.nvembed_embed_utf8(pg_catalog.convert_to($1, 'UTF8'),
                                      pg_catalog.convert_to(pg_catalog.current_setting('nvembed.query_instruction'), 'UTF8'));

-- Query embedding for a custom retrieval task: "Instruct: {task}\nQuery: ".
CREATE FUNCTION nvembed_query(text, task text) RETURNS real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN @extschema@.nvembed_embed_utf8(pg_catalog.convert_to($1, 'UTF8'),
                                      pg_catalog.convert_to('Instruct: ' OPERATOR(pg_catalog.||) $2 OPERATOR(pg_catalog.||) E'\nQuery: ', 'UTF8'));

-- Passage embedding (no instruction).
CREATE FUNCTION nvembed_passage(text) RETURNS real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN @extschema@.nvembed_embed_utf8(pg_catalog.convert_to($1, 'UTF8'), '\x'::pg_catalog.bytea);

-- Many texts in one round trip to the model: one row per input, in input order, NULL for NULL.
CREATE FUNCTION nvembed_passages(texts text[]) RETURNS SETOF real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT @extschema@.nvembed_embed_many_utf8(
        ARRAY(SELECT pg_catalog.convert_to(t, 'UTF8') FROM pg_catalog.unnest(texts) WITH ORDINALITY AS u(t, n) ORDER BY n),
        '\x'::pg_catalog.bytea);
END;

CREATE FUNCTION nvembed_queries(texts text[]) RETURNS SETOF real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT @extschema@.nvembed_embed_many_utf8(
        ARRAY(SELECT pg_catalog.convert_to(t, 'UTF8') FROM pg_catalog.unnest(texts) WITH ORDINALITY AS u(t, n) ORDER BY n),
        pg_catalog.convert_to(pg_catalog.current_setting('nvembed.query_instruction'), 'UTF8'));
END;

CREATE FUNCTION nvembed_queries(texts text[], task text) RETURNS SETOF real[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT @extschema@.nvembed_embed_many_utf8(
        ARRAY(SELECT pg_catalog.convert_to(t, 'UTF8') FROM pg_catalog.unnest(texts) WITH ORDINALITY AS u(t, n) ORDER BY n),
        pg_catalog.convert_to('Instruct: ' OPERATOR(pg_catalog.||) task OPERATOR(pg_catalog.||) E'\nQuery: ', 'UTF8'));
END;
