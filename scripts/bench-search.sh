#!/usr/bin/env bash
# Search at scale (part of `make bench`; runs alone too). Prints table rows (workload | measured |
# target) on stdout, progress on stderr:
# 1. BENCH_SEARCH_ROWS (default 100,000) synthetic 4,096-dim vectors, clustered around a shared
#    direction as decoder embeddings are (scripts/testing/search-vectors.py says how and why), and
#    BENCH_SEARCH_QUERIES (default 100) queries: recall@10 against exact search and p95 latency
#    of nvembed_search on its centred index, of the same on an un-centred index, of the README's
#    recipe before and after its ef_search fix, and of exact search; build time and size of both
#    indexes.
# 2. The vectors the medium checkpoint gives BENCH_SEARCH_TEXTS (default 2,000) real texts (the
#    docstrings of Python's standard library) and 50 query texts: recall@10 of a centred and an
#    un-centred index at the same number of candidates.
# Needs numpy (installed from PyPI into BENCH_VENV) and ~4 GB under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
ROWS=${BENCH_SEARCH_ROWS:-100000}
QUERIES=${BENCH_SEARCH_QUERIES:-100}
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

# 1. Synthetic vectors.
echo "generating $ROWS vectors of $DIM dims..." >&2
"$PY" scripts/testing/search-vectors.py generate "$DATA" "$ROWS" "$QUERIES" "$DIM" >&2
"$PY" - "$DATA" <<'PY'
import sys, numpy as np
d = sys.argv[1]
with open(f"{d}/queries.tsv", "w") as f:
    for i, v in enumerate(np.load(f"{d}/queries.npy")):
        f.write(f"{i + 1}\t{{{','.join(repr(float(x)) for x in v)}}}\n")
PY
chmod a+r "$DATA"/*
# No embedding call in this cluster: with no model loaded, the column's dimension is not checked
# against the tiny model's.
cluster_start "$TINY" "shared_buffers = '4GB'" "maintenance_work_mem = '2GB'"
"${PSQL[@]}" <<SQL
CREATE EXTENSION vector;
CREATE EXTENSION nvembed;
CREATE TABLE bench (id int PRIMARY KEY, e vector($DIM));
CREATE TABLE bench_query (id int PRIMARY KEY, v real[]);
CREATE TABLE bench_result (method text, qid int, ids int[], ms float8);
COPY bench FROM '$DATA/base.copy' WITH (FORMAT binary);
COPY bench_query FROM '$DATA/queries.tsv';
VACUUM ANALYZE bench;
SQL

read -r exact_recall exact_p95 < <(search exact 'SELECT array_agg(id ORDER BY d) FROM (SELECT id, e <#> $1::vector AS d FROM bench ORDER BY d LIMIT 10) x')

t0=$(now)
"${PSQL[@]}" -c "CREATE INDEX by_hand ON bench USING hnsw ((binary_quantize(e)::bit($DIM)) bit_hamming_ops)"
plain_build=$(calc "round($(now) - $t0, 1)")
plain_mb=$("${PSQL[@]}" -At -c "SELECT round(pg_relation_size('by_hand') / 1048576.0)")
RECIPE="SELECT array_agg(id ORDER BY d) FROM (SELECT id, e <#> \$1::vector AS d FROM (
          SELECT id, e FROM bench ORDER BY binary_quantize(e)::bit($DIM) <~> binary_quantize(\$1::vector)::bit($DIM) LIMIT 200) c
        ORDER BY d LIMIT 10) x"
read -r old_recall old_p95 < <(search recipe_ef40 "$RECIPE")
"${PSQL[@]}" -c "ALTER DATABASE postgres SET hnsw.ef_search = 200"
read -r fixed_recall fixed_p95 < <(search recipe_ef200 "$RECIPE")
"${PSQL[@]}" -c "ALTER DATABASE postgres RESET hnsw.ef_search"
SEARCH='SELECT array_agg((s.item).id ORDER BY s.score DESC) FROM nvembed_search(NULL::bench, $1, 10) s'
read -r plain_recall plain_p95 < <(search search_plain "$SEARCH")
"${PSQL[@]}" -c "DROP INDEX by_hand"

t0=$(now)
index=$("${PSQL[@]}" -At -c "SELECT nvembed_create_search_index('bench')")
centred_build=$(calc "round($(now) - $t0, 1)")
centred_mb=$("${PSQL[@]}" -At -c "SELECT round(pg_relation_size('$index') / 1048576.0)")
read -r centred_recall centred_p95 < <(search search_centred "$SEARCH")
read -r c200_recall c200_p95 < <(search search_centred_200 'SELECT array_agg((s.item).id ORDER BY s.score DESC) FROM nvembed_search(NULL::bench, $1, 10, candidates => 200) s')
read -r c1000_recall c1000_p95 < <(search search_centred_1000 'SELECT array_agg((s.item).id ORDER BY s.score DESC) FROM nvembed_search(NULL::bench, $1, 10, candidates => 1000) s')
table_mb=$("${PSQL[@]}" -At -c "SELECT round(pg_total_relation_size('bench') / 1048576.0)")
cluster_stop

what="$ROWS synthetic $DIM-dim vectors ($table_mb MB), $QUERIES queries"
row "search: nvembed_search, centred index, default 400 candidates ($what)" "recall@10 $centred_recall, p95 $centred_p95 ms" "recall@10 ≥ 0.95"
row "search: nvembed_search, centred index, 200 / 1,000 candidates" "recall@10 $c200_recall / $c1000_recall, p95 $c200_p95 / $c1000_p95 ms" "—"
row "search: nvembed_search, un-centred index, 400 candidates" "recall@10 $plain_recall, p95 $plain_p95 ms" "—"
row "search: README recipe before the fix (un-centred, LIMIT 200 at ef_search 40)" "recall@10 $old_recall, p95 $old_p95 ms" "—"
row "search: README recipe with ef_search 200 (un-centred)" "recall@10 $fixed_recall, p95 $fixed_p95 ms" "—"
row "search: exact (sequential scan, $EXACT_QUERIES queries)" "recall@10 $exact_recall, p95 $exact_p95 ms" "—"
row "search: index build, centred / un-centred (nvembed_create_search_index / CREATE INDEX)" \
  "$centred_build s, $centred_mb MB / $plain_build s, $plain_mb MB" "—"

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
INSERT INTO docs SELECT t.id, t.body, v::vector
FROM (SELECT array_agg(id ORDER BY id) AS ids, array_agg(body ORDER BY id) AS bodies FROM texts WHERE id <= $TEXTS) a,
     unnest(a.ids, ARRAY(SELECT nvembed_passages(a.bodies))) AS u(id, v) JOIN texts t ON t.id = u.id;
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
"${PSQL[@]}" -c "CREATE INDEX by_hand ON docs USING hnsw ((binary_quantize(e)::bit($dim)) bit_hamming_ops)"
plain20=$(recall 20); plain50=$(recall 50)
"${PSQL[@]}" -c "DROP INDEX by_hand" -c "SELECT nvembed_create_search_index('docs')" >/dev/null
centred20=$(recall 20); centred50=$(recall 50)
n=$("${PSQL[@]}" -At -c "SELECT count(*) FROM docs")
row "search: medium checkpoint's $dim-dim vectors of $n real texts (embedded in $embed_s s), 50 query texts: recall@10 at 20 / 50 candidates, centred vs un-centred index" \
  "$centred20 / $centred50 vs $plain20 / $plain50" "—"
