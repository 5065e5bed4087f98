-- Search at scale.
--
-- pgvector indexes `vector` up to 2,000 dimensions and `halfvec` up to 4,000; NV-Embed-v2 gives
-- 4,096. Such columns are indexed by one sign bit per dimension (binary_quantize(...)::bit(n), an
-- HNSW index with Hamming distance) and searched in two steps: the index's nearest candidates,
-- then the exact inner product over those candidates only.
--
-- The bits are the signs of the vector minus the column's mean, not of the vector itself:
-- embeddings of decoder models share a common direction, so un-centred sign bits are mostly the
-- same for every row and say little about which rows are near (scripts/bench-search.sh
-- measures both). The mean is an IMMUTABLE SQL function of its own beside the table,
-- `<table>_<column>_centre()`, which the index expression calls: a 4,096-dim constant written
-- into the expression would not fit in pg_index's row (pg_index has no TOAST), and the planner
-- inlines the function, so queries match the index as if the constant were written out. Nothing
-- else is recorded: nvembed_search finds the index and its centre function in the index
-- definition, so a dropped or renamed index, pg_dump and restore, and a standby need no
-- bookkeeping, and an index made by hand as binary_quantize(column)::bit(n) (not centred) is
-- used too.
--
-- nvembed_search is SECURITY INVOKER and does not pin search_path: the caller's filter is the
-- caller's SQL, resolved as the caller's own WHERE clause would be. Everything nvembed adds to
-- the statements is schema-qualified.

-- Limits, as named constants (functions, so the tests and the README read the same numbers).
-- Rows the centre is computed from: a mean of 50,000 unit vectors is within ~0.005 per
-- dimension of the column's, far below the spread of the bits it centres.
CREATE FUNCTION nvembed_search_centre_sample_rows() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN 50000;
-- Candidates the index gives for re-ranking when the caller does not say: recall@10 ≥ 0.95
-- on the benchmark's 100,000 clustered vectors (README, "Search and indexing").
CREATE FUNCTION nvembed_search_default_candidates(k integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN pg_catalog.int4larger(400, k OPERATOR(pg_catalog.*) 10);

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
-- else) and, while a model is loaded, n must be the model's dimension.
CREATE FUNCTION nvembed_search_column(tbl regclass, requested_column name,
                                      OUT column_name name, OUT type_name name, OUT dimensions integer)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    relkind "char";
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    type_schema name;
    model_dimension integer;
    found_columns name[];
BEGIN
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
    SELECT t.typname, n.nspname, a.atttypmod INTO type_name, type_schema, dimensions
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE a.attrelid = tbl AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column % of relation % does not exist', quote_ident(column_name), tbl USING ERRCODE = 'undefined_column';
    END IF;
    IF type_name NOT IN ('vector', 'halfvec') OR type_schema <> vector_schema THEN
        RAISE EXCEPTION 'column % of % has type %, not vector(n) or halfvec(n)', quote_ident(column_name), tbl,
            format_type((SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = column_name), dimensions)
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE vector(n) USING %I::vector(n), with n the model''s dimension.',
                                tbl, column_name, column_name);
    END IF;
    IF dimensions <= 0 THEN
        RAISE EXCEPTION 'column % of % has no fixed dimension', quote_ident(column_name), tbl USING ERRCODE = 'datatype_mismatch',
            HINT = format('An index of sign bits needs every row to have the same length: ALTER TABLE %s ALTER COLUMN %I TYPE %s(n), with n the model''s dimension.',
                          tbl, column_name, type_name);
    END IF;
    model_dimension := @extschema@.nvembed_model_dimension();
    IF model_dimension IS NOT NULL AND dimensions <> model_dimension THEN
        RAISE EXCEPTION 'column % of % has % dimensions, but the model''s vectors have %', quote_ident(column_name), tbl,
            dimensions, model_dimension
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE %s(%s), and embed the column again.', tbl, column_name, type_name, model_dimension);
    END IF;
END;
$$;

-- The index expression over `column_name`: sign bits of the column minus `centre()`, or of the
-- column itself when `centre` is NULL. Written as pg_get_expr prints it when search_path is
-- pg_catalog alone (a regprocedure's text is then the qualified call), so nvembed_search_index
-- can compare the two.
CREATE FUNCTION nvembed_search_index_expression(column_name name, dimensions integer, centre regprocedure)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN centre IS NULL
    THEN format('(%I.binary_quantize(%I))::bit(%s)', @extschema@.nvembed_search_vector_schema(), column_name, dimensions)
    ELSE format('(%1$I.binary_quantize((%2$I OPERATOR(%1$I.-) %3$s)))::bit(%4$s)',
                @extschema@.nvembed_search_vector_schema(), column_name, centre::text, dimensions)
END;

-- The valid sign-bit index of `tbl`'s `column_name`, centred ones first, with its expression
-- (fully schema-qualified) and its centre function (NULL for an un-centred index); no row if
-- there is none. A centre function is IMMUTABLE, takes nothing and returns the column's type.
-- Read from the catalog on every call: an index dropped or created since is seen at once.
CREATE FUNCTION nvembed_search_index(tbl regclass, column_name name, dimensions integer,
                                     OUT index regclass, OUT expression text, OUT centre regprocedure)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT i.index, i.expression, f.oid::regprocedure
    FROM (SELECT x.indexrelid::regclass AS index, pg_get_expr(x.indexprs, x.indrelid) AS expression,
                 to_regprocedure(substring(pg_get_expr(x.indexprs, x.indrelid)
                                           FROM 'OPERATOR\(\S+\.-\) (\S+\(\))\)\)\)::bit\(\d+\)$')) AS centre
          FROM pg_index x
          JOIN pg_class c ON c.oid = x.indexrelid
          JOIN pg_am am ON am.oid = c.relam
          JOIN pg_opclass o ON o.oid = x.indclass[0]
          JOIN pg_namespace n ON n.oid = o.opcnamespace
          WHERE x.indrelid = $1 AND am.amname = 'hnsw' AND o.opcname = 'bit_hamming_ops'
            AND n.nspname = @extschema@.nvembed_search_vector_schema()
            AND x.indisvalid AND x.indisready AND x.indnkeyatts = 1 AND x.indkey[0] = 0 AND x.indpred IS NULL) i
    LEFT JOIN pg_proc f ON f.oid = i.centre AND f.provolatile = 'i' AND f.pronargs = 0
                       AND f.prorettype = (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = $1 AND a.attname = $2)
    WHERE i.expression = @extschema@.nvembed_search_index_expression($2, $3, f.oid::regprocedure)
    ORDER BY f.oid IS NULL, i.index
$$;

-- The CREATE INDEX statement nvembed_create_search_index runs, for running it yourself
-- (CONCURRENTLY, with other HNSW parameters, in a maintenance window). A centred one computes
-- the column's mean now, from a sample of up to nvembed_search_centre_sample_rows() rows, and
-- (re)creates the centre function `<table>_<column>_centre()` in the table's schema.
CREATE FUNCTION nvembed_search_index_statement(tbl regclass, column_name name DEFAULT NULL, centred boolean DEFAULT true,
                                               build_concurrently boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record := @extschema@.nvembed_search_column(tbl, column_name);
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    existing regclass;
    estimated_rows double precision;
    sample text := '';
    mean text;
    table_schema name;
    centre_name text;
    centre regprocedure;
BEGIN
    IF centred IS NULL OR build_concurrently IS NULL THEN
        RAISE EXCEPTION 'centred and build_concurrently must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT s.index INTO existing FROM @extschema@.nvembed_search_index(tbl, col.column_name, col.dimensions) s LIMIT 1;
    IF existing IS NOT NULL THEN
        RAISE EXCEPTION 'column % of % already has a search index, %', quote_ident(col.column_name), tbl, existing
            USING ERRCODE = 'duplicate_object', HINT = format('To centre it on the column''s current mean, DROP INDEX %s first.', existing);
    END IF;
    IF centred THEN
        -- reltuples of the table, or of its partitions (a partitioned table's own is -1).
        SELECT sum(c.reltuples) FILTER (WHERE c.reltuples > 0) INTO estimated_rows
        FROM pg_class c WHERE c.oid = tbl OR c.oid IN (SELECT p.relid FROM pg_partition_tree(tbl) p);
        IF estimated_rows > @extschema@.nvembed_search_centre_sample_rows() THEN
            sample := format(' TABLESAMPLE BERNOULLI (%s) REPEATABLE (0)',
                             100.0 * @extschema@.nvembed_search_centre_sample_rows() / estimated_rows);
        END IF;
        EXECUTE format('SELECT %I.avg(t.%I)::text FROM %s t%s WHERE t.%I IS NOT NULL',
                       vector_schema, col.column_name, tbl, sample, col.column_name)
            INTO mean;
        IF mean IS NULL THEN
            RAISE EXCEPTION 'column % of % has no vectors yet to centre an index on', quote_ident(col.column_name), tbl
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Create the index once some rows are embedded (the mean of a few thousand is enough), or pass centred => false.';
        END IF;
        SELECT n.nspname, c.relname || '_' || col.column_name || '_centre' INTO table_schema, centre_name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
        IF octet_length(centre_name) > 63 THEN -- NAMEDATALEN - 1
            centre_name := 'centre_' || md5(tbl::text || '.' || col.column_name);
        END IF;
        EXECUTE format('CREATE OR REPLACE FUNCTION %1$I.%2$I() RETURNS %3$I.%4$I(%5$s) LANGUAGE sql IMMUTABLE PARALLEL SAFE '
                       'RETURN %6$L::%3$I.%4$I(%5$s)',
                       table_schema, centre_name, vector_schema, col.type_name, col.dimensions, mean);
        centre := format('%I.%I()', table_schema, centre_name)::regprocedure;
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', centre,
                       format('The mean of %s.%I when its nvembed search index was made: the centre of the index''s sign bits.',
                              tbl, col.column_name));
    END IF;
    RETURN format('CREATE INDEX%s ON %s USING hnsw ((%s) %I.bit_hamming_ops)',
                  CASE WHEN build_concurrently THEN ' CONCURRENTLY' ELSE '' END, tbl,
                  @extschema@.nvembed_search_index_expression(col.column_name, col.dimensions, centre),
                  vector_schema);
END;
$$;

-- One call: the search index of a column nvembed fills (NULL: the table's one vector column),
-- built now; returns the index. Rows written later are indexed as they are written.
CREATE FUNCTION nvembed_create_search_index(tbl regclass, column_name name DEFAULT NULL, centred boolean DEFAULT true)
RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record := @extschema@.nvembed_search_column(tbl, column_name);
BEGIN
    EXECUTE @extschema@.nvembed_search_index_statement(tbl, col.column_name, centred, false);
    RETURN (SELECT s.index FROM @extschema@.nvembed_search_index(tbl, col.column_name, col.dimensions) s LIMIT 1);
END;
$$;

-- The k rows of source's table nearest to `query` (a vector, or an array of the model's
-- dimension), best first, with their inner product (= cosine: the vectors are unit length).
-- `source` is any value of the table's row type, NULL::docs for instance: the rows come back as
-- that type. `filter` is a condition on the table's columns, applied before the limit. Uses the
-- column's search index when there is one (nvembed_create_search_index): `candidates` rows by
-- Hamming distance, re-ranked exactly; without one, or if the index finds fewer than k rows
-- that pass the filter, the exact scan. The hnsw settings it needs are the caller's again when
-- it returns.
CREATE FUNCTION nvembed_search(source anyelement, query real[], k integer DEFAULT 10, filter text DEFAULT NULL,
                               column_name name DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, score double precision)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    tbl regclass := (SELECT t.typrelid FROM pg_catalog.pg_type t
                     WHERE t.oid OPERATOR(pg_catalog.=) pg_catalog.pg_typeof(source) AND t.typrelid OPERATOR(pg_catalog.<>) 0);
    col record;
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    index record;
    typed_query text;
    query_bits bit varying;
    wanted integer := COALESCE(candidates, @extschema@.nvembed_search_default_candidates(k));
    condition text := pg_catalog.format('(%s)', COALESCE(filter, 'true'));
    saved_ef_search text;
    saved_iterative_scan text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'nvembed_search: source must be a row of the table to search, not a value of type %', pg_catalog.pg_typeof(source)
            USING ERRCODE = 'wrong_object_type', HINT = 'Pass the table''s row type: nvembed_search(NULL::docs, ...).';
    END IF;
    IF k IS NULL OR k OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'nvembed_search: k must be at least 1, not %', COALESCE(k::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF wanted OPERATOR(pg_catalog.<) k THEN
        RAISE EXCEPTION 'nvembed_search: candidates (%) must be at least k (%)', wanted, k USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Leave candidates NULL for the default, 10 × k and at least 400.';
    END IF;
    col := @extschema@.nvembed_search_column(tbl, column_name);
    IF query IS NULL THEN
        RETURN;
    END IF;
    IF pg_catalog.cardinality(query) OPERATOR(pg_catalog.<>) col.dimensions THEN
        RAISE EXCEPTION 'nvembed_search: the query vector has % dimensions, column % of % has %', pg_catalog.cardinality(query),
            pg_catalog.quote_ident(col.column_name), tbl, col.dimensions
            USING ERRCODE = 'data_exception', HINT = 'Embed the query with the model that filled the column.';
    END IF;
    typed_query := pg_catalog.format('$1::%I.%I', vector_schema, col.type_name);
    SELECT s.index, s.expression, s.centre INTO index
    FROM @extschema@.nvembed_search_index(tbl, col.column_name, col.dimensions) s LIMIT 1;
    IF index.index IS NOT NULL THEN
        EXECUTE pg_catalog.format(CASE WHEN index.centre IS NULL THEN 'SELECT %1$I.binary_quantize(%2$s)::pg_catalog.varbit'
                                       ELSE 'SELECT %1$I.binary_quantize(%2$s OPERATOR(%1$I.-) %3$s)::pg_catalog.varbit' END,
                                  vector_schema, typed_query, index.centre::text)
            INTO query_bits USING query;
        -- An HNSW scan stops after hnsw.ef_search rows (at most 1,000) unless iterative scans
        -- (pgvector 0.8.0) carry it on; both are set for this statement only (the pgvector
        -- library is loaded by now: the query was cast by it).
        saved_ef_search := pg_catalog.current_setting('hnsw.ef_search', true);
        saved_iterative_scan := pg_catalog.current_setting('hnsw.iterative_scan', true);
        PERFORM pg_catalog.set_config('hnsw.ef_search', pg_catalog.int4smaller(wanted, 1000)::text, true);
        IF saved_iterative_scan IS NOT NULL THEN
            PERFORM pg_catalog.set_config('hnsw.iterative_scan', 'relaxed_order', true);
        END IF;
        RETURN QUERY EXECUTE pg_catalog.format(
            'WITH candidate AS MATERIALIZED ('
            '    SELECT t AS item, t.%3$I AS v FROM %4$s t WHERE %5$s ORDER BY %6$s OPERATOR(%1$I.<~>) $3 LIMIT $4), '
            'enough AS (SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>=) $2 AS yes FROM candidate) '
            'SELECT r.item, r.score FROM ('
            '    (SELECT c.item, OPERATOR(pg_catalog.-) (c.v OPERATOR(%1$I.<#>) %2$s) AS score FROM candidate c'
            '     WHERE (SELECT e.yes FROM enough e) ORDER BY c.v OPERATOR(%1$I.<#>) %2$s LIMIT $2)'
            '    UNION ALL '
            '    (SELECT t, OPERATOR(pg_catalog.-) (t.%3$I OPERATOR(%1$I.<#>) %2$s) FROM %4$s t'
            '     WHERE NOT (SELECT e.yes FROM enough e) AND t.%3$I IS NOT NULL AND %5$s'
            '     ORDER BY t.%3$I OPERATOR(%1$I.<#>) %2$s LIMIT $2)) r '
            'ORDER BY r.score DESC',
            vector_schema, typed_query, col.column_name, tbl, condition, index.expression)
            USING query, k, query_bits, wanted;
        PERFORM pg_catalog.set_config('hnsw.ef_search', saved_ef_search, true);
        IF saved_iterative_scan IS NOT NULL THEN
            PERFORM pg_catalog.set_config('hnsw.iterative_scan', saved_iterative_scan, true);
        END IF;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT t, OPERATOR(pg_catalog.-) (t.%3$I OPERATOR(%1$I.<#>) %2$s) FROM %4$s t WHERE t.%3$I IS NOT NULL AND %5$s '
        'ORDER BY t.%3$I OPERATOR(%1$I.<#>) %2$s LIMIT $2',
        vector_schema, typed_query, col.column_name, tbl, condition)
        USING query, k;
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
