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
