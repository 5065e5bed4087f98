#!/usr/bin/env bash
# Search at scale (part of `make bench`; runs alone too). Prints table rows (workload | measured |
# target) on stdout, progress on stderr:
# 1. BENCH_SEARCH_ROWS (default 100,000) synthetic 4,096-dim vectors, clustered around a shared
#    direction as decoder embeddings are (scripts/testing/search-vectors.py says how and why), in
#    two strengths of that direction (unrelated rows at cosine ~0.56 and ~0.85), and
#    BENCH_SEARCH_QUERIES (default 500) queries each: recall@10 against exact search and p95
#    latency of nvembed_search (default and other numbers of candidates), of the same on a centred
#    index, of the README's recipe before and after its ef_search fix, and of exact search; build
#    time and size of the index.
# 2. The vectors the medium checkpoint gives BENCH_SEARCH_TEXTS (default 2,000) real texts (first
#    sentences of the docstrings of Python's standard library) and 50 query texts: recall@10 of
#    the index with and without a centre at few candidates.
# Needs numpy (installed from PyPI into BENCH_VENV) and ~4 GB under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
ROWS=${BENCH_SEARCH_ROWS:-100000}
QUERIES=${BENCH_SEARCH_QUERIES:-500}
EXACT_QUERIES=${BENCH_SEARCH_EXACT_QUERIES:-20}
TEXTS=${BENCH_SEARCH_TEXTS:-2000}
DIM=4096
NUMPY_VERSION=2.2.6
VENV=${BENCH_VENV:-/tmp/nvembed-bench/venv}
TINY=engine/tests/fixtures/nvembed-tiny-a
MEDIUM=target/nvembed-bench/medium
DATA=$(mktemp -d /tmp/nvembed-bench-search.XXXXXX)
chmod 755 "$DATA"
trap 'cluster_stop; rm -rf "$DATA"' EXIT
calc() { python3 -c "print($1)"; }
row() { echo "| $1 | $2 | $3 |"; echo "| $1 | $2 | $3 |" >&2; }
now() { date +%s.%N; }

if ! "$VENV/bin/python" -c "import numpy, sys; sys.exit(numpy.__version__ != '$NUMPY_VERSION')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "numpy==$NUMPY_VERSION"
fi
PY="$VENV/bin/python"

# search METHOD SQL: runs SQL (a query for `ids int[]`, the top 10, with $1 the query as real[]) for
# every query (the first EXACT_QUERIES for exact search), each timed inside the server; prints
# "recall p95_ms".
search() {
  local method=$1 sql=$2 limit=$QUERIES
  [ "$method" = exact ] && limit=$EXACT_QUERIES
  "${PSQL[@]}" -v method="$method" -v sql="$sql" -v lim="$limit" >/dev/null <<'SQL'
SELECT set_config('bench.method', :'method', false), set_config('bench.sql', :'sql', false), set_config('bench.limit', :'lim', false);
DO $$
DECLARE q record; t0 timestamptz; ids int[];
BEGIN
    FOR q IN SELECT * FROM bench_query ORDER BY id LIMIT current_setting('bench.limit')::int LOOP
        t0 := clock_timestamp();
        EXECUTE current_setting('bench.sql') INTO ids USING q.v;
        INSERT INTO bench_result VALUES (current_setting('bench.method'), q.id, ids,
                                         1000 * extract(epoch FROM clock_timestamp() - t0));
    END LOOP;
END $$;
SQL
  "${PSQL[@]}" -At -c "SELECT qid || ' ' || array_to_string(ids, ',') FROM bench_result WHERE method = '$method'" > "$DATA/$method.txt"
  echo "$("$PY" scripts/testing/search-vectors.py recall "$DATA" "$DATA/$method.txt" 10) $("${PSQL[@]}" -At \
    -c "SELECT round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 1) FROM bench_result WHERE method = '$method'")"
}
# index NAME SQL: builds an index with SQL; prints "seconds MB" of it.
index() {
  local t0; t0=$(now)
  "${PSQL[@]}" -c "$2" >/dev/null
  echo "$(calc "round($(now) - $t0, 1)") $("${PSQL[@]}" -At -c "SELECT round(pg_relation_size(indexrelid) / 1048576.0) FROM pg_index WHERE indrelid = 'bench'::regclass AND NOT indisprimary")"
}
SEARCH='SELECT array_agg((s.item).id ORDER BY s.score DESC) FROM nvembed_search(NULL::bench, $1, 10'
RECIPE="SELECT array_agg(id ORDER BY d) FROM (SELECT id, e <#> \$1::vector AS d FROM (
          SELECT id, e FROM bench ORDER BY binary_quantize(e)::bit($DIM) <~> binary_quantize(\$1::vector)::bit($DIM) LIMIT 200) c
        ORDER BY d LIMIT 10) x"

# 1. Synthetic vectors. No embedding call in this cluster: with no model loaded, the column's
#    dimension is not held against the tiny model's.
cluster_start "$TINY" "shared_buffers = '4GB'" "maintenance_work_mem = '2GB'" "max_wal_size = '8GB'"
"${PSQL[@]}" -c "CREATE EXTENSION vector" -c "CREATE EXTENSION nvembed" >/dev/null
for shared in 0.75 1.6; do
  echo "generating $ROWS vectors of $DIM dims (shared direction weight $shared)..." >&2
  spread=$("$PY" scripts/testing/search-vectors.py generate "$DATA" "$ROWS" "$QUERIES" "$DIM" "$shared" | grep -o 'cosine of unrelated rows [0-9.]*' | grep -o '[0-9.]*$')
  "$PY" - "$DATA" <<'PY'
import sys, numpy as np
d = sys.argv[1]
with open(f"{d}/queries.tsv", "w") as f:
    for i, v in enumerate(np.load(f"{d}/queries.npy")):
        f.write(f"{i + 1}\t{{{','.join(repr(float(x)) for x in v)}}}\n")
PY
  chmod a+r "$DATA"/*
  "${PSQL[@]}" >/dev/null <<SQL
DROP TABLE IF EXISTS bench, bench_query, bench_result;
DROP FUNCTION IF EXISTS bench_e_centre();
CREATE TABLE bench (id int PRIMARY KEY, e vector($DIM));
CREATE TABLE bench_query (id int PRIMARY KEY, v real[]);
CREATE TABLE bench_result (method text, qid int, ids int[], ms float8);
COPY bench FROM '$DATA/base.copy' WITH (FORMAT binary);
COPY bench_query FROM '$DATA/queries.tsv';
VACUUM ANALYZE bench;
SQL
  rm "$DATA/base.copy" "$DATA/base.npy"
  table_mb=$("${PSQL[@]}" -At -c "SELECT round(pg_total_relation_size('bench') / 1048576.0)")
  what="$ROWS vectors of $DIM dims, unrelated rows at cosine $spread, $QUERIES queries"
  if [ "$shared" = 0.75 ]; then
    read -r recall p95 < <(search exact 'SELECT array_agg(id ORDER BY d) FROM (SELECT id, e <#> $1::vector AS d FROM bench ORDER BY d LIMIT 10) x')
    row "search: exact, sequential scan ($what; table $table_mb MB; $EXACT_QUERIES queries)" "recall@10 $recall, p95 $p95 ms" "—"
  fi
  read -r build_s index_mb < <(index plain "SELECT nvembed_create_search_index('bench')")
  read -r recall p95 < <(search search "$SEARCH) s")
  row "search: nvembed_search, default (200 candidates) ($what)" "recall@10 $recall, p95 $p95 ms" "recall@10 ≥ 0.95"
  for c in 100 400; do
    read -r recall p95 < <(search "search_$c" "$SEARCH, candidates => $c) s")
    row "search: nvembed_search, $c candidates (cosine $spread)" "recall@10 $recall, p95 $p95 ms" "—"
  done
  read -r recall p95 < <(search recipe_ef40 "$RECIPE")
  row "search: README recipe before its fix, LIMIT 200 at ef_search 40 (cosine $spread)" "recall@10 $recall, p95 $p95 ms" "—"
  "${PSQL[@]}" -c "ALTER DATABASE postgres SET hnsw.ef_search = 200" >/dev/null
  read -r recall p95 < <(search recipe_ef200 "$RECIPE")
  "${PSQL[@]}" -c "ALTER DATABASE postgres RESET hnsw.ef_search" >/dev/null
  row "search: README recipe with ef_search 200 (cosine $spread)" "recall@10 $recall, p95 $p95 ms" "—"
  row "search: index build, nvembed_create_search_index (cosine $spread)" "$build_s s, $index_mb MB" "—"
  "${PSQL[@]}" -c "DROP INDEX bench_binary_quantize_idx" >/dev/null
  read -r centred_s _ < <(index centred "SELECT nvembed_create_search_index('bench', centred => true)")
  read -r recall p95 < <(search centred "$SEARCH) s")
  read -r recall100 _ < <(search centred_100 "$SEARCH, candidates => 100) s")
  row "search: nvembed_search on a centred index, 200 / 100 candidates (cosine $spread; built in $centred_s s)" \
    "recall@10 $recall / $recall100, p95 $p95 ms at 200" "—"
done
cluster_stop

# 2. The medium checkpoint's vectors of real texts: first sentences of the standard library's
#    docstrings; queries are first sentences of docstrings not in the table.
[ -f "$MEDIUM/config.json" ] || cargo bench -q -p nvembed-engine --bench medium -- --generate >&2
python3 - "$DATA/texts.tsv" "$TEXTS" <<'PY'
import importlib, inspect, re, sys
modules = """os re json collections itertools functools string datetime decimal fractions statistics random
math pathlib shutil subprocess socket ssl http.client urllib.parse urllib.request email.message csv sqlite3
logging argparse unittest typing asyncio threading multiprocessing zipfile tarfile gzip hashlib hmac
secrets base64 struct codecs textwrap difflib heapq bisect array queue sched selectors signal tempfile
glob fnmatch io pickle copy pprint enum dataclasses contextlib abc inspect ast dis tokenize
xml.etree.ElementTree html.parser calendar locale gettext uuid ipaddress smtplib ftplib imaplib wave
zlib bz2 lzma configparser shlex platform sysconfig traceback warnings weakref operator numbers time""".split()
seen, texts = set(), []
for name in modules:
    module = importlib.import_module(name)
    objects = [module] + [v for _, v in sorted(vars(module).items())]
    objects += [m for o in objects if inspect.isclass(o) for _, m in sorted(vars(o).items())]
    for o in objects:
        doc = inspect.getdoc(o) if callable(o) or inspect.ismodule(o) else None
        if not doc:
            continue
        first = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()))[0]
        words = first.split()
        if 6 <= len(words) <= 30 and first not in seen and "\t" not in first and "\\" not in first:
            seen.add(first)
            texts.append(first)
n = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for i, t in enumerate(texts[: n + 50]):
        f.write(f"{i + 1}\t{t}\n")
print(f"{min(len(texts), n + 50)} texts", file=sys.stderr)
PY
chmod a+r "$DATA/texts.tsv"
cluster_start "$MEDIUM" "nvembed.threads = 2"
dim=$(python3 -c "import json; print(json.load(open('$MEDIUM/config.json'))['latent_attention_config']['latent_dim'])")
t0=$(now)
"${PSQL[@]}" <<SQL
CREATE EXTENSION vector;
CREATE EXTENSION nvembed;
CREATE TABLE texts (id int PRIMARY KEY, body text);
COPY texts FROM '$DATA/texts.tsv';
CREATE TABLE docs (id int PRIMARY KEY, body text, e vector($dim));
INSERT INTO docs SELECT t.id, t.body, e.v::vector
FROM (SELECT array_agg(body ORDER BY id) AS bodies FROM texts WHERE id <= $TEXTS) a,
     nvembed_passages(a.bodies) WITH ORDINALITY AS e(v, n) JOIN texts t ON t.id = e.n;
CREATE TABLE queries AS SELECT id, nvembed_query(body) AS v FROM texts WHERE id > $TEXTS;
CREATE TABLE truth AS SELECT q.id, ARRAY(SELECT d.id FROM docs d ORDER BY d.e <#> q.v::vector LIMIT 10) AS ids FROM queries q;
ANALYZE docs;
SQL
embed_s=$(calc "round($(now) - $t0, 1)")
# recall CANDIDATES: mean recall@10 of nvembed_search with CANDIDATES against exact search.
recall() {
  "${PSQL[@]}" -At -c "SET enable_seqscan = off" -c "
    SELECT round(avg((SELECT count(*) FROM unnest(t.ids) i WHERE i = ANY (s.ids)) / 10.0), 3)
    FROM truth t JOIN queries q USING (id),
         LATERAL (SELECT array_agg((r.item).id) AS ids FROM nvembed_search(NULL::docs, q.v, 10, candidates => $1) r) s"
}
"${PSQL[@]}" -c "SELECT nvembed_create_search_index('docs')" >/dev/null
plain20=$(recall 20); plain50=$(recall 50)
"${PSQL[@]}" -c "DROP INDEX docs_binary_quantize_idx" -c "SELECT nvembed_create_search_index('docs', centred => true)" >/dev/null
centred20=$(recall 20); centred50=$(recall 50)
n=$("${PSQL[@]}" -At -c "SELECT count(*) FROM docs")
row "search: medium checkpoint's $dim-dim vectors of $n real texts (embedded in $embed_s s), 50 query texts: recall@10 at 20 / 50 candidates, index without / with a centre" \
  "$plain20 / $plain50 vs $centred20 / $centred50" "—"
