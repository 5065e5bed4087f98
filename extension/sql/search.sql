-- Search at scale.
--
-- pgvector indexes `vector` up to 2,000 dimensions and `halfvec` up to 4,000; NV-Embed-v2 gives
-- 4,096. Such columns are indexed by one sign bit per dimension (binary_quantize(...)::bit(n), an
-- HNSW index with Hamming distance) and searched in two steps: the index's nearest candidates,
-- then the exact inner product over those candidates only.
--
-- The bits are the signs of the vector itself by default. Embeddings of decoder models share a
-- common direction, so many of those bits are the same for every row; the signs of the vector
-- minus the column's mean (`centred => true`) spread the bits, but scripts/bench-search.sh
-- measured them no better and mostly a little worse (README): the Hamming distance of raw signs
-- estimates the angle between query and row, which for unit vectors is the ranking itself, while
-- centred signs estimate the angle between the centred vectors, which leaves out each row's own
-- share of the common direction. A centre is an IMMUTABLE SQL function of its own beside the
-- table, `<table>_<column>_centre()`, which the index expression calls: a 4,096-dim constant
-- written into the expression would not fit in pg_index's row (pg_index has no TOAST), and the
-- planner inlines the function, so queries match the index as if the constant were written out.
-- Nothing else is recorded: nvembed_search finds the index (and its centre function) in the
-- index definition, so a dropped or renamed index, pg_dump and restore, and a standby need no
-- bookkeeping, and an index made by hand as binary_quantize(column)::bit(n) is used too.
--
-- nvembed_search is SECURITY INVOKER and does not pin search_path: the caller's filter is the
-- caller's SQL, resolved as the caller's own WHERE clause would be. Everything nvembed adds to
-- the statements is schema-qualified.

-- Limits, as named constants (functions, so the tests and the README read the same numbers).
-- Rows the centre is computed from: a mean of 50,000 unit vectors is within ~0.005 per
-- dimension of the column's, far below the spread of the bits it centres.
CREATE FUNCTION nvembed_search_centre_sample_rows() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN 50000;
-- Candidates the index gives for re-ranking when the caller does not say (README, "Search and
-- indexing", has what the benchmark measured at this and other numbers).
CREATE FUNCTION nvembed_search_default_candidates(k integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN pg_catalog.int8smaller(2147483647, pg_catalog.int8larger(200, k::pg_catalog.int8 OPERATOR(pg_catalog.*) 10))::pg_catalog.int4;

-- A search's filter, as one argument: the planner inlines it and sees the condition itself (for
-- index use and partition pruning), and a filter that tried to close the parentheses around it
-- would need a top-level comma, which is an error.
CREATE FUNCTION nvembed_search_condition(boolean) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN $1;

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
-- else) and, when `against_model` and a model is loaded, n must be the model's dimension (a
-- search checks its query vector instead: asking the model server costs a round trip).
CREATE FUNCTION nvembed_search_column(tbl regclass, requested_column name, against_model boolean,
                                      OUT column_name name, OUT type_name name, OUT dimensions integer)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    relkind "char";
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    type_schema name;
    type_oid oid;
    model_dimension integer;
    found_columns name[];
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'the table must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
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
    SELECT a.atttypid, t.typname, n.nspname, a.atttypmod INTO type_oid, type_name, type_schema, dimensions
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE a.attrelid = tbl AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column % of relation % does not exist', quote_ident(column_name), tbl USING ERRCODE = 'undefined_column';
    END IF;
    IF type_name NOT IN ('vector', 'halfvec') OR type_schema <> vector_schema THEN
        RAISE EXCEPTION 'column % of % has type %, not vector(n) or halfvec(n)', quote_ident(column_name), tbl,
            format_type(type_oid, dimensions)
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE vector(n) USING %I::vector(n), with n the model''s dimension.',
                                tbl, column_name, column_name);
    END IF;
    IF dimensions <= 0 THEN
        RAISE EXCEPTION 'column % of % has no fixed dimension', quote_ident(column_name), tbl USING ERRCODE = 'datatype_mismatch',
            HINT = format('An index of sign bits needs every row to have the same length: ALTER TABLE %s ALTER COLUMN %I TYPE %s(n), with n the model''s dimension.',
                          tbl, column_name, type_name);
    END IF;
    IF against_model THEN
        model_dimension := @extschema@.nvembed_model_dimension();
    END IF;
    IF model_dimension IS NOT NULL AND dimensions <> model_dimension THEN
        RAISE EXCEPTION 'column % of % has % dimensions, but the model''s vectors have %', quote_ident(column_name), tbl,
            dimensions, model_dimension
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE %s(%s), and embed the column again.', tbl, column_name, type_name, model_dimension);
    END IF;
END;
$$;

-- The index expression over `column_name`: sign bits of the column minus the centre function
-- that `centre_call` calls, or of the column itself when `centre_call` is NULL. Written as
-- pg_get_expr prints it when search_path is pg_catalog alone (names in pg_catalog unqualified,
-- others qualified), so nvembed_search_index can compare the two.
CREATE FUNCTION nvembed_search_index_expression(column_name name, dimensions integer, centre_call text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    qualifier text := CASE WHEN vector_schema = 'pg_catalog' THEN '' ELSE quote_ident(vector_schema) || '.' END;
    minus text := CASE WHEN vector_schema = 'pg_catalog' THEN '-' ELSE format('OPERATOR(%I.-)', vector_schema) END;
BEGIN
    IF centre_call IS NULL THEN
        RETURN format('(%sbinary_quantize(%I))::bit(%s)', qualifier, column_name, dimensions);
    END IF;
    RETURN format('(%sbinary_quantize((%I %s %s)))::bit(%s)', qualifier, column_name, minus, centre_call, dimensions);
END;
$$;

-- How an index expression calls centre function `centre`: qualified, and a function of the
-- session's own temporary schema as pg_temp.name() (as pg_get_expr prints it).
CREATE FUNCTION nvembed_search_centre_call(centre regprocedure) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT CASE WHEN p.pronamespace = pg_my_temp_schema() THEN 'pg_temp.' || quote_ident(p.proname) || '()'
                    ELSE centre::text END
        FROM pg_proc p WHERE p.oid = centre);

-- The valid sign-bit index of `tbl`'s `column_name`, centred ones first, with its expression and
-- its centre function's call (both fully schema-qualified; the call NULL for an un-centred
-- index); no row if there is none. A centre function is one the index depends on that is
-- IMMUTABLE, takes nothing and returns the column's type. Read from the catalog on every call:
-- an index dropped or created since is seen at once.
CREATE FUNCTION nvembed_search_index(tbl regclass, column_name name, dimensions integer,
                                     OUT index regclass, OUT expression text, OUT centre text)
RETURNS SETOF record
LANGUAGE plpgsql STABLE -- not sql: a PL/pgSQL function keeps its plan for the session
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT i.index, i.expression, centre.call
    FROM (SELECT x.indexrelid, x.indexrelid::regclass AS index, pg_get_expr(x.indexprs, x.indrelid) AS expression
          FROM pg_index x
          JOIN pg_class c ON c.oid = x.indexrelid
          JOIN pg_am am ON am.oid = c.relam
          JOIN pg_opclass o ON o.oid = x.indclass[0]
          JOIN pg_namespace n ON n.oid = o.opcnamespace
          WHERE x.indrelid = $1 AND am.amname = 'hnsw' AND o.opcname = 'bit_hamming_ops'
            AND n.nspname = (SELECT @extschema@.nvembed_search_vector_schema())
            AND x.indisvalid AND x.indisready AND x.indnkeyatts = 1 AND x.indkey[0] = 0 AND x.indpred IS NULL) i
    LEFT JOIN (pg_depend d JOIN pg_proc f ON f.oid = d.refobjid AND f.provolatile = 'i' AND f.pronargs = 0
                                         AND f.prorettype = (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = $1 AND a.attname = $2))
           ON d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid AND d.refclassid = 'pg_proc'::regclass
    CROSS JOIN LATERAL (SELECT @extschema@.nvembed_search_centre_call(f.oid::regprocedure) AS call) centre
    WHERE i.expression = @extschema@.nvembed_search_index_expression($2, $3, centre.call)
    ORDER BY f.oid IS NULL, i.index;
END;
$$;

-- The CREATE INDEX statement of a search index of `tbl`'s column `column_name` (of pgvector's
-- `type_name`, `dimensions` long, as nvembed_search_column found it). A centred one computes
-- the column's mean now, from a sample of up to nvembed_search_centre_sample_rows() rows, and
-- creates its centre function in the table's schema: `<table>_<column>_centre()`, or that name
-- with a number when it is taken (an index that would replace another's centre would no longer
-- match its own rows).
CREATE FUNCTION nvembed_search_index_sql(tbl regclass, column_name name, type_name name, dimensions integer,
                                         centred boolean, build_concurrently boolean)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    vector_schema name := @extschema@.nvembed_search_vector_schema();
    existing regclass;
    estimated_rows double precision;
    sample text := '';
    mean text;
    table_schema name;
    base_name text;
    centre_name text;
    suffix integer := 1;
    centre regprocedure;
BEGIN
    IF centred IS NULL OR build_concurrently IS NULL THEN
        RAISE EXCEPTION 'centred and build_concurrently must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF build_concurrently AND (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) = 'p' THEN
        RAISE EXCEPTION 'PostgreSQL cannot build an index of a partitioned table concurrently' USING ERRCODE = 'feature_not_supported',
            HINT = 'Build it without build_concurrently; or, as PostgreSQL documents for partitioned tables, CREATE INDEX ON ONLY the table, the same index CONCURRENTLY on each partition, then ALTER INDEX ... ATTACH PARTITION each (nvembed_search uses the table''s index once all are attached).';
    END IF;
    SELECT s.index INTO existing FROM @extschema@.nvembed_search_index(tbl, column_name, dimensions) s LIMIT 1;
    IF existing IS NOT NULL THEN
        RAISE EXCEPTION 'column % of % already has a search index, %', quote_ident(column_name), tbl, existing
            USING ERRCODE = 'duplicate_object', HINT = format('To make it again (another kind, or centred on the column''s current mean), DROP INDEX %s first.', existing);
    END IF;
    IF centred THEN
        -- reltuples of the table and of its partitions or inheritance children (a partitioned
        -- table's own is -1), all of which the mean is taken over.
        WITH RECURSIVE tree(oid) AS (SELECT tbl::oid UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
        SELECT sum(c.reltuples) FILTER (WHERE c.reltuples > 0) INTO estimated_rows FROM pg_class c JOIN tree USING (oid);
        IF estimated_rows > @extschema@.nvembed_search_centre_sample_rows() THEN
            sample := format(' TABLESAMPLE BERNOULLI (%s) REPEATABLE (0)',
                             100.0 * @extschema@.nvembed_search_centre_sample_rows() / estimated_rows);
        END IF;
        EXECUTE format('SELECT %I.avg(t.%I)::text FROM %s t%s WHERE t.%I IS NOT NULL',
                       vector_schema, column_name, tbl, sample, column_name)
            INTO mean;
        IF mean IS NULL THEN
            RAISE EXCEPTION 'column % of % has no vectors yet to centre an index on', quote_ident(column_name), tbl
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Create the index once some rows are embedded (the mean of a few thousand is enough), or leave centred false.';
        END IF;
        SELECT n.nspname, c.relname || '_' || column_name || '_centre' INTO table_schema, base_name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
        IF octet_length(base_name) > 55 THEN -- NAMEDATALEN - 1, less room for a number
            base_name := 'centre_' || md5(tbl::text || '.' || column_name);
        END IF;
        centre_name := base_name;
        WHILE to_regprocedure(format('%I.%I()', table_schema, centre_name)) IS NOT NULL LOOP
            suffix := suffix + 1;
            centre_name := base_name || '_' || suffix;
        END LOOP;
        EXECUTE format('CREATE FUNCTION %1$I.%2$I() RETURNS %3$I.%4$I(%5$s) LANGUAGE sql IMMUTABLE PARALLEL SAFE '
                       'RETURN %6$L::%3$I.%4$I(%5$s)',
                       table_schema, centre_name, vector_schema, type_name, dimensions, mean);
        centre := format('%I.%I()', table_schema, centre_name)::regprocedure;
        -- Every role that writes the table evaluates the index expression.
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', centre);
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', centre,
                       format('The mean of %s.%I when its nvembed search index was made: the centre of the index''s sign bits. Drop it with that index.',
                              tbl, column_name));
    END IF;
    RETURN format('CREATE INDEX%s ON %s USING hnsw ((%s) %I.bit_hamming_ops)',
                  CASE WHEN build_concurrently THEN ' CONCURRENTLY' ELSE '' END, tbl,
                  @extschema@.nvembed_search_index_expression(column_name, dimensions, @extschema@.nvembed_search_centre_call(centre)),
                  vector_schema);
END;
$$;

-- The CREATE INDEX statement nvembed_create_search_index runs, for running it yourself
-- (CONCURRENTLY, with other HNSW parameters, in a maintenance window); a centred one's centre
-- function is made now.
CREATE FUNCTION nvembed_search_index_statement(tbl regclass, column_name name DEFAULT NULL, centred boolean DEFAULT false,
                                               build_concurrently boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record := @extschema@.nvembed_search_column(tbl, column_name, true);
BEGIN
    RETURN @extschema@.nvembed_search_index_sql(tbl, col.column_name, col.type_name, col.dimensions, centred, build_concurrently);
END;
$$;

-- One call: the search index of a column nvembed fills (NULL: the table's one vector column),
-- built now; returns the index. Rows written later are indexed as they are written.
CREATE FUNCTION nvembed_create_search_index(tbl regclass, column_name name DEFAULT NULL, centred boolean DEFAULT false)
RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record := @extschema@.nvembed_search_column(tbl, column_name, true);
BEGIN
    -- Self-conflicting, and no more than CREATE INDEX blocks (writes): a second call waits, then
    -- finds the first one's index. (A materialized view cannot be locked so; only REFRESH writes it.)
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) <> 'm' THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
    END IF;
    EXECUTE @extschema@.nvembed_search_index_sql(tbl, col.column_name, col.type_name, col.dimensions, centred, false);
    RETURN (SELECT s.index FROM @extschema@.nvembed_search_index(tbl, col.column_name, col.dimensions) s LIMIT 1);
END;
$$;

-- Table `tbl`'s name, schema-qualified and quoted, as the statements of a search name it.
CREATE FUNCTION nvembed_search_relation(tbl regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = tbl);

-- The k rows of source's table nearest to `query` (a vector, or an array of the model's
-- dimension), best first, with their inner product (= cosine: the vectors are unit length).
-- `source` is any value of the table's row type, NULL::docs for instance: the rows come back as
-- that type. `filter` is a condition on the table's columns, applied before the limit. Uses the
-- column's search index when there is one (nvembed_create_search_index): `candidates` rows by
-- Hamming distance, re-ranked exactly; without one, or if fewer than k of the rows the index
-- scan reached pass the filter, the exact scan.
-- The best rows are found first as (tableoid, ctid, distance) arrays, and only those k rows are
-- then read whole (a 4,096-dim vector is 16 KB of TOAST to read again); STABLE, so both
-- statements see the caller's snapshot and a position still names the same row. No CTE or alias
-- of nvembed's own stands between the filter and the table: the filter may name the table, and a
-- table of the caller's named like one of nvembed's CTEs would otherwise be hidden by it. The
-- filter is the one argument of nvembed_search_condition, on lines of its own, so it stays one
-- expression (a top-level comma is an error, a -- comment ends with its line).
-- The hnsw settings it changes for its scan are the caller's again when it returns.
CREATE FUNCTION nvembed_search(source anyelement, query real[], k integer DEFAULT 10, filter text DEFAULT NULL,
                               column_name name DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, score double precision)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    tbl pg_catalog.regclass := (SELECT t.typrelid FROM pg_catalog.pg_type t
                                WHERE t.oid OPERATOR(pg_catalog.=) pg_catalog.pg_typeof(source)
                                  AND t.typrelid OPERATOR(pg_catalog.<>) 0);
    col record;
    vector_schema pg_catalog.name := @extschema@.nvembed_search_vector_schema();
    index record;
    relation pg_catalog.text;
    typed_query pg_catalog.text;
    query_bits pg_catalog.text;
    wanted integer;
    condition pg_catalog.text;
    -- The best rows of a query for (rel, row_id, distance, passed) as arrays, in distance order.
    best_of pg_catalog.text := 'SELECT pg_catalog.array_agg(b.rel ORDER BY b.distance, b.rel, b.row_id),'
        '       pg_catalog.array_agg(b.row_id ORDER BY b.distance, b.rel, b.row_id),'
        '       pg_catalog.array_agg(b.distance ORDER BY b.distance, b.rel, b.row_id), pg_catalog.max(b.passed)'
        ' FROM (%s) b';
    rels pg_catalog.oid[];
    row_ids pg_catalog.tid[];
    distances double precision[];
    passed bigint;
    saved_ef_search pg_catalog.text;
    saved_iterative_scan pg_catalog.text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'nvembed_search: source must be a row of the table to search, not a value of type %', pg_catalog.pg_typeof(source)
            USING ERRCODE = 'wrong_object_type', HINT = 'Pass the table''s row type: nvembed_search(NULL::docs, ...).';
    END IF;
    IF k IS NULL OR k OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'nvembed_search: k must be at least 1, not %', COALESCE(k::pg_catalog.text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    wanted := COALESCE(candidates, @extschema@.nvembed_search_default_candidates(k));
    IF wanted OPERATOR(pg_catalog.<) k THEN
        RAISE EXCEPTION 'nvembed_search: candidates (%) must be at least k (%)', wanted, k USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Leave candidates NULL for the default, 10 × k and at least 200.';
    END IF;
    col := @extschema@.nvembed_search_column(tbl, column_name, false);
    IF query IS NULL THEN
        RETURN;
    END IF;
    IF pg_catalog.cardinality(query) OPERATOR(pg_catalog.<>) col.dimensions THEN
        RAISE EXCEPTION 'nvembed_search: the query vector has % dimensions, column % of % has %', pg_catalog.cardinality(query),
            pg_catalog.quote_ident(col.column_name), tbl, col.dimensions
            USING ERRCODE = 'data_exception', HINT = 'Embed the query with the model that filled the column.';
    END IF;
    -- Qualified, so that nothing of the caller's (a CTE in a filter, a table earlier in
    -- search_path) can stand for it; unaliased, so that the filter may name it.
    relation := @extschema@.nvembed_search_relation(tbl);
    typed_query := pg_catalog.format('$1::%I.%I', vector_schema, col.type_name);
    condition := pg_catalog.format(E'%1$s.%2$I IS NOT NULL AND @extschema@.nvembed_search_condition((\n%3$s\n))',
                                   relation, col.column_name, COALESCE(filter, 'true'));
    -- The query cast by pgvector, which loads its library: its hnsw settings exist from here on.
    EXECUTE pg_catalog.format('SELECT %s IS NULL', typed_query) USING query;
    SELECT s.index, s.expression, s.centre INTO index
    FROM @extschema@.nvembed_search_index(tbl, col.column_name, col.dimensions) s LIMIT 1;
    IF index.index IS NOT NULL THEN
        query_bits := pg_catalog.format(CASE WHEN index.centre IS NULL THEN '(SELECT %1$I.binary_quantize(%2$s)::pg_catalog.varbit)'
                                             ELSE '(SELECT %1$I.binary_quantize(%2$s OPERATOR(%1$I.-) %3$s)::pg_catalog.varbit)' END,
                                        vector_schema, typed_query, index.centre);
        -- An HNSW scan stops after hnsw.ef_search rows (at most 1,000) unless iterative scans
        -- (pgvector 0.8.0) carry it on. Both are set with set_config(..., true), which lasts
        -- to the end of the transaction, and put back right after the statement.
        saved_ef_search := pg_catalog.current_setting('hnsw.ef_search', true);
        saved_iterative_scan := pg_catalog.current_setting('hnsw.iterative_scan', true);
        PERFORM pg_catalog.set_config('hnsw.ef_search', pg_catalog.int4smaller(wanted, 1000)::pg_catalog.text, true);
        IF saved_iterative_scan IS NOT NULL THEN
            PERFORM pg_catalog.set_config('hnsw.iterative_scan', 'relaxed_order', true);
        END IF;
        EXECUTE pg_catalog.format(best_of, pg_catalog.format(
            'SELECT c.rel, c.row_id, c.v OPERATOR(%1$I.<#>) %2$s AS distance, pg_catalog.count(*) OVER () AS passed'
            ' FROM (SELECT %3$s.tableoid AS rel, %3$s.ctid AS row_id, %3$s.%4$I AS v FROM %3$s WHERE %5$s'
            '       ORDER BY %6$s OPERATOR(%1$I.<~>) %7$s LIMIT $3) c'
            ' ORDER BY c.v OPERATOR(%1$I.<#>) %2$s LIMIT $2',
            vector_schema, typed_query, relation, col.column_name, condition,
            index.expression, query_bits))
            INTO rels, row_ids, distances, passed USING query, k, wanted;
        PERFORM pg_catalog.set_config('hnsw.ef_search', saved_ef_search, true);
        IF saved_iterative_scan IS NOT NULL THEN
            PERFORM pg_catalog.set_config('hnsw.iterative_scan', saved_iterative_scan, true);
        END IF;
    END IF;
    -- No index, or the filter passed fewer than k of the rows the index scan reached (or the
    -- table has fewer): every row the filter passes, exactly. (`+ 0`: an ordinary HNSW or
    -- IVFFlat index of the column, which would answer ORDER BY <#> approximately, cannot.)
    IF COALESCE(passed, 0) OPERATOR(pg_catalog.<) k THEN
        EXECUTE pg_catalog.format(best_of, pg_catalog.format(
            'SELECT %3$s.tableoid AS rel, %3$s.ctid AS row_id,'
            '       (%3$s.%4$I OPERATOR(%1$I.<#>) %2$s) OPERATOR(pg_catalog.+) 0 AS distance, NULL::pg_catalog.int8 AS passed'
            ' FROM %3$s WHERE %5$s ORDER BY distance LIMIT $2',
            vector_schema, typed_query, relation, col.column_name, condition))
            INTO rels, row_ids, distances, passed USING query, k;
    END IF;
    -- The rows themselves: ROW(t.*), not t, which would be a column of that name if the table
    -- has one.
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT ROW(t.*)::%1$s, OPERATOR(pg_catalog.-) b.distance'
        ' FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3)) WITH ORDINALITY AS b(rel, row_id, distance, n)'
        ' JOIN %2$s AS t ON t.tableoid OPERATOR(pg_catalog.=) b.rel AND t.ctid OPERATOR(pg_catalog.=) b.row_id ORDER BY b.n',
        pg_catalog.pg_typeof(source), relation)
        USING rels, row_ids, distances;
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

-- The chunk table nvembed_search_documents searches for the rows of `tbl`: that of its chunk
-- vectorizer, or `requested` (which must be one of its chunk vectorizers' tables).
CREATE FUNCTION nvembed_search_chunk_table(tbl regclass, requested regclass) RETURNS regclass
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found integer;
    chunk_table regclass;
BEGIN
    SELECT count(*), min(v.chunk_table::oid)::regclass INTO found, chunk_table
    FROM @extschema@.nvembed_vectorizer v
    WHERE v.tbl = $1 AND v.chunk_table IS NOT NULL AND (requested IS NULL OR v.chunk_table = requested);
    IF found = 0 THEN
        RAISE EXCEPTION 'nvembed_search_documents: %', CASE WHEN requested IS NULL THEN format('no chunk vectorizer fills a chunk table of %s', tbl)
                                                            ELSE format('%s is not a chunk table of %s', requested, tbl) END
            USING ERRCODE = 'undefined_object',
                  HINT = format('nvembed_create_chunk_vectorizer(%L, ...) makes one; nvembed_search searches a table of its own vectors.', tbl);
    ELSIF found > 1 THEN
        RAISE EXCEPTION 'nvembed_search_documents: % has % chunk tables', tbl, found
            USING ERRCODE = 'ambiguous_parameter',
                  HINT = 'Name one: chunk_table => ''...''. SELECT chunk_table FROM nvembed_vectorizer_status lists them.';
    END IF;
    RETURN chunk_table;
END;
$$;

-- Searches the rows of a table by their chunks (a chunk vectorizer's table): nvembed_search over
-- the chunks, then each row's best chunk. Returns the k rows whose best chunks score highest,
-- best first, each with that chunk, its number and its score. `filter` is a condition on the
-- rows themselves (as in nvembed_search; it may name the table). Fewer than k rows' chunks among
-- the best ones (a row's chunks crowd the others out, or rows the caller may not see) fetch four
-- times as many chunks, until k rows have one or no more chunks pass.
CREATE FUNCTION nvembed_search_documents(source anyelement, query real[], k integer DEFAULT 10, filter text DEFAULT NULL,
                                         chunk_table regclass DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, chunk text, chunk_seq integer, score double precision)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    tbl pg_catalog.regclass := (SELECT t.typrelid FROM pg_catalog.pg_type t
                                WHERE t.oid OPERATOR(pg_catalog.=) pg_catalog.pg_typeof(source)
                                  AND t.typrelid OPERATOR(pg_catalog.<>) 0);
    chunks pg_catalog.regclass;
    relation pg_catalog.text;
    chunk_relation pg_catalog.text;
    keys_of_item pg_catalog.text;
    rows_match pg_catalog.text;
    chunks_match pg_catalog.text;
    condition pg_catalog.text;
    wanted integer;
    found bigint;
    rows_found bigint;
    rels pg_catalog.oid[];
    row_ids pg_catalog.tid[];
    texts pg_catalog.text[];
    seqs integer[];
    scores double precision[];
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'nvembed_search_documents: source must be a row of the table to search, not a value of type %', pg_catalog.pg_typeof(source)
            USING ERRCODE = 'wrong_object_type', HINT = 'Pass the table''s row type: nvembed_search_documents(NULL::docs, ...).';
    END IF;
    IF k IS NULL OR k OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'nvembed_search_documents: k must be at least 1, not %', COALESCE(k::pg_catalog.text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    chunks := @extschema@.nvembed_search_chunk_table(tbl, chunk_table);
    relation := @extschema@.nvembed_search_relation(tbl);
    chunk_relation := @extschema@.nvembed_search_relation(chunks);
    SELECT pg_catalog.string_agg(pg_catalog.format('(f.item).%I', key_part.chunk_column), ', ' ORDER BY key_part.key_position),
           pg_catalog.string_agg(pg_catalog.format('t.%I %s (b.item).%I', key_part.column_name, key_part.equals, key_part.chunk_column),
                                 ' AND ' ORDER BY key_part.key_position),
           pg_catalog.string_agg(pg_catalog.format('%s.%I %s %s.%I', relation, key_part.column_name, key_part.equals, chunk_relation,
                                                   key_part.chunk_column),
                                 ' AND ' ORDER BY key_part.key_position)
    INTO keys_of_item, rows_match, chunks_match
    FROM @extschema@.nvembed_vectorizer_chunk_key(chunks, tbl) key_part;
    IF keys_of_item IS NULL THEN
        RAISE EXCEPTION 'nvembed_search_documents: % has no foreign key to the primary key of %', chunks, tbl
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Drop the chunk table and create the chunk vectorizer again.';
    END IF;
    -- The filter is the rows': evaluated for each chunk on its row (the table unaliased, so the
    -- filter may name it; its columns before the chunk table's).
    condition := CASE WHEN filter IS NOT NULL
                      THEN pg_catalog.format(E'EXISTS (SELECT FROM %s WHERE %s AND @extschema@.nvembed_search_condition((\n%s\n)))',
                                             relation, chunks_match, filter) END;
    wanted := pg_catalog.int4smaller(k, 2147483647 / 4) OPERATOR(pg_catalog.*) 4;
    LOOP
        -- Each row's best chunk among those found, for the rows the caller sees.
        EXECUTE pg_catalog.format(
            'WITH found AS MATERIALIZED (SELECT s.item, s.score FROM @extschema@.nvembed_search(NULL::%1$s, $1, $2, $3, ''embedding'', $4) s),
                  best AS (SELECT DISTINCT ON (%2$s) f.item, f.score FROM found f ORDER BY %2$s, f.score DESC, (f.item).chunk_seq),
                  seen AS MATERIALIZED (SELECT b.item, b.score, t.tableoid AS rel, t.ctid AS row_id FROM best b JOIN %3$s t ON %4$s),
                  top AS (SELECT * FROM seen ORDER BY seen.score DESC, (seen.item).chunk_seq LIMIT $5)
             SELECT (SELECT pg_catalog.count(*) FROM found), (SELECT pg_catalog.count(*) FROM seen),
                    pg_catalog.array_agg(top.rel ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg(top.row_id ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg((top.item).chunk ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg((top.item).chunk_seq ORDER BY top.score DESC, (top.item).chunk_seq),
                    pg_catalog.array_agg(top.score ORDER BY top.score DESC, (top.item).chunk_seq)
             FROM top',
            chunks, keys_of_item, relation, rows_match)
            INTO found, rows_found, rels, row_ids, texts, seqs, scores
            USING query, wanted, condition, pg_catalog.int4larger(candidates, wanted), k;
        EXIT WHEN rows_found OPERATOR(pg_catalog.>=) k OR found OPERATOR(pg_catalog.<) wanted
                  OR wanted OPERATOR(pg_catalog.>) 2147483647 / 4;
        wanted := wanted OPERATOR(pg_catalog.*) 4;
    END LOOP;
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT ROW(t.*)::%1$s, b.chunk, b.chunk_seq, b.score'
        ' FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5))'
        '      WITH ORDINALITY AS b(rel, row_id, chunk, chunk_seq, score, n)'
        ' JOIN %2$s AS t ON t.tableoid OPERATOR(pg_catalog.=) b.rel AND t.ctid OPERATOR(pg_catalog.=) b.row_id ORDER BY b.n',
        pg_catalog.pg_typeof(source), relation)
        USING rels, row_ids, texts, seqs, scores;
END;
$$;

-- The same, for a query text: embedded with the session's nvembed.query_instruction.
CREATE FUNCTION nvembed_search_documents(source anyelement, query text, k integer DEFAULT 10, filter text DEFAULT NULL,
                                         chunk_table regclass DEFAULT NULL, candidates integer DEFAULT NULL)
RETURNS TABLE (item anyelement, chunk text, chunk_seq integer, score double precision)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN QUERY SELECT s.item, s.chunk, s.chunk_seq, s.score
                 FROM @extschema@.nvembed_search_documents(source, @extschema@.nvembed_query(query), k, filter, chunk_table, candidates) s;
END;
$$;
