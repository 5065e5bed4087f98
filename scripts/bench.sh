#!/usr/bin/env bash
# `make bench`: nvembed's benchmark suite. Prints one table (workload | measured | target) and
# writes it, with the date and machine, to bench/results-DATE.md. Not part of `make test`.
# BENCH_BULK_ROWS (default 2000) and BENCH_SECONDS (pgbench duration, default 15) shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
ROWS=${BENCH_BULK_ROWS:-2000}
SECONDS_PER_RUN=${BENCH_SECONDS:-15}
TINY=engine/tests/fixtures/nvembed-tiny-a
MEDIUM=target/nvembed-bench/medium
TABLE=()
row() { TABLE+=("| $1 | $2 | $3 |"); echo "| $1 | $2 | $3 |" >&2; }
now() { date +%s.%N; }
calc() { python3 -c "print($1)"; }
# The model server's RSS (VmRSS, bytes) via its pid in nvembed_status().
server_rss() {
  local pid; pid=$("${PSQL[@]}" -Atc "SELECT pid FROM nvembed_status()")
  awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$pid/status"
}

# 1. Engine (also generates the medium checkpoint once).
while IFS= read -r line; do TABLE+=("$line"); echo "$line" >&2; done < <(
  cargo bench -q -p nvembed-engine --bench medium 2>/dev/null | grep -E '^\| (embed|peak|RSS|load)' | sed 's/^| /| engine: /')
# 1b. Compute: dtypes × matmul backends × oneDNN ISA caps, efficiency and stages (its own tables).
COMPUTE=$(cargo bench -q -p nvembed-engine --bench compute 2>/dev/null)
echo "$COMPUTE" >&2
# 1c. NV-Embed-v2's real widths (a few layers, generated once): per layer, projected, bounds.
REAL_SHAPE=$(cargo bench -q -p nvembed-engine --bench real_shape 2>/dev/null)
echo "$REAL_SHAPE" >&2
install_nvembed
PARAMS=$(python3 - "$MEDIUM/model.safetensors" <<'PY'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
print(sum(eval("*".join(map(str, v["shape"])) or "1") for k, v in header.items() if k != "__metadata__"))
PY
)

# 2. SQL overhead per call, tiny model: 1000 sequential SELECTs vs 1000 direct engine forward passes.
texts=$(mktemp); sqlfile=$(mktemp); trap 'rm -f "$texts" "$sqlfile"; cluster_stop' EXIT
python3 - "$texts" "$sqlfile" <<'PY'
import json, sys
with open(sys.argv[1], "w") as t, open(sys.argv[2], "w") as s:
    for i in range(1000):
        text = f"a short passage number {i} about boats and harbours"
        t.write(json.dumps(text) + "\n")
        s.write(f"SELECT nvembed_passage('{text}') IS NOT NULL;\n")
PY
chmod a+r "$texts" "$sqlfile"
cluster_start "$TINY"
"${PSQL[@]}" -c "CREATE EXTENSION nvembed" -c "SELECT nvembed_passage('warm up') IS NOT NULL" >/dev/null
t0=$(now); "${PSQL[@]}" -f "$sqlfile" >/dev/null; t1=$(now)
t2=$(now); target/release/nvembed embed --model "$TINY" --passage --batch-tokens 1 < "$texts" >/dev/null; t3=$(now)
t4=$(now); head -n1 "$texts" | target/release/nvembed embed --model "$TINY" --passage >/dev/null; t5=$(now)
overhead=$(calc "round((($t1-$t0) - (($t3-$t2) - ($t5-$t4))) / 1000 * 1000, 3)")
row "SQL overhead per call (tiny model, 1000 sequential SELECT nvembed_passage vs direct engine)" "$overhead ms" "≤ 1 ms"
cluster_stop

# Medium model from here on.
cluster_start "$MEDIUM" "nvembed.threads = 2" "nvembed.vectorizer_databases = 'postgres'"
"${PSQL[@]}" -c "CREATE EXTENSION nvembed" >/dev/null
# 6. Load: first request to first vector.
t0=$(now); "${PSQL[@]}" -c "SELECT nvembed_passage('first') IS NOT NULL" >/dev/null; t1=$(now)
row "load: first request to first vector (medium, f32)" "$(calc "round($t1-$t0, 2)") s" "—"
# 5a. Model process RSS after load.
row "memory: model process RSS after load ÷ weight bytes (medium, f32)" "$(calc "round($(server_rss) / ($PARAMS * 4), 3)")" "≤ 1.15"

# 3. Concurrency: ~12-token queries, 1 session vs 8.
cat > "$sqlfile" <<'SQL'
\set r random(1, 1000000000)
SELECT nvembed_query('how do boats number ' || :r || ' cross the bay?') IS NOT NULL;
SQL
tps() { "${PGBENCH[@]}" -n -f "$sqlfile" -c "$1" -j "$1" -T "$SECONDS_PER_RUN" postgres 2>/dev/null | awk '/^tps/ {print $3}'; }
one=$(tps 1); eight=$(tps 8)
row "concurrency: short queries, 8 sessions vs 1 (medium; $one vs $eight q/s)" "$(calc "round($eight / $one, 2)")×" "≥ 3×"

# The same queries in one call: numbers drawn as pgbench draws them (most have nine digits, and
# each digit is a token), so both sides embed texts of the same lengths.
one_call=$(python3 -c "print(80 / $( { t0=$(now); "${PSQL[@]}" -c "SELECT count(*) FROM nvembed_queries(ARRAY(SELECT 'how do boats number ' || (1 + floor(random() * 1000000000))::bigint || ' cross the bay?' FROM generate_series(1, 80) g))" >/dev/null; calc "$(now) - $t0"; } ))")
row "serving: short queries, 8 sessions vs the same queries, 80 in one call (medium; $eight vs $(calc "round($one_call, 2)") q/s)" "$(calc "round($eight / $one_call, 2)")×" "≥ 0.85×"

# 7. Serving under load: single-query latency idle vs during a bulk call of ≥ 60 s, and the time
#    from pg_cancel_backend of a bulk call until a fresh query is served.
query_ms() { local t0; t0=$(now); "${PSQL[@]}" -c "SELECT nvembed_query('how do boats cross the bay, question $1?') IS NOT NULL" >/dev/null; calc "round(($(now) - $t0) * 1000)"; }
worst() { python3 -c "import sys; print(max(int(x) for x in sys.argv[1:]))" "$@"; }
idle=(); for i in $(seq 8); do idle+=("$(query_ms "idle $i")"); done
idle_worst=$(worst "${idle[@]}")
BULK_SQL="SELECT count(*) FROM nvembed_passages(ARRAY(SELECT g || ' ' || repeat('The harbour town wakes slowly on winter mornings while boats rock at the quay. ', 25) FROM generate_series(1, ${BENCH_BULK_TEXTS:-40}) g))"
t0=$(now); "${PSQL[@]}" -c "$BULK_SQL" >/dev/null & bulk=$!
sleep 3
loaded=(); while kill -0 "$bulk" 2>/dev/null; do loaded+=("$(query_ms "loaded ${#loaded[@]}")"); sleep 1; done
wait "$bulk"; bulk_s=$(calc "round($(now) - $t0)")
load_worst=$(worst "${loaded[@]}")
row "serving: worst single-query latency during a $bulk_s s bulk call vs idle (medium; $load_worst vs $idle_worst ms, ${#loaded[@]} vs ${#idle[@]} queries)" "$(calc "round($load_worst / $idle_worst, 2)")×" "≤ 2×"
"${PSQL[@]}" -c "$BULK_SQL" >/dev/null 2>&1 & bulk=$!
sleep 5
t0=$(now)
"${PSQL[@]}" -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT count(*) FROM nvembed_passages%'" >/dev/null
after_cancel=$(query_ms "after cancel"); cancel_ms=$(calc "round(($(now) - $t0) * 1000)")
wait "$bulk" || true
row "serving: pg_cancel_backend of a bulk call until a fresh query is answered vs an idle query (medium; $cancel_ms vs $idle_worst ms)" "$(calc "round($cancel_ms / $idle_worst, 2)")×" "≤ 2×"

# 4. Bulk: backfill vs the per-row trigger, ~100-token passages.
"${PSQL[@]}" <<SQL
CREATE TABLE bulk (id int PRIMARY KEY, body text, embedding real[]);
INSERT INTO bulk SELECT g, 'Passage ' || g || '. ' || repeat('The harbour town wakes slowly on winter mornings while boats rock at the quay. ', 6)
FROM generate_series(1, $ROWS) g;
CREATE TABLE bulk_trigger (LIKE bulk);
CREATE TRIGGER e BEFORE INSERT ON bulk_trigger FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'embedding');
SQL
t0=$(now); "${PSQL[@]}" -c "CALL nvembed_backfill('bulk', 'body', 'embedding', 'passage', 64)" 2>/dev/null; t1=$(now)
t2=$(now); "${PSQL[@]}" -c "INSERT INTO bulk_trigger SELECT id, body FROM bulk" ; t3=$(now)
backfill=$(calc "round($ROWS / ($t1-$t0), 2)"); trigger=$(calc "round($ROWS / ($t3-$t2), 2)")
row "bulk: backfill vs per-row trigger, $ROWS rows × ~100 tokens (medium; $backfill vs $trigger rows/s)" "$(calc "round($backfill / $trigger, 2)")×" "≥ 2×"

# 8. Vectorizer: what a COPY into a vectorized table costs (the enqueueing), and how fast the
#    workers drain a queue against one nvembed_passages call on the same texts. COPYs are timed
#    with the workers paused (nvembed.vectorizer_databases empty): the model's compute would
#    otherwise share the cores with the COPY.
vectorizer_workers() { "${PSQL[@]}" -c "ALTER SYSTEM SET nvembed.vectorizer_databases = '$1'" -c "SELECT pg_reload_conf()" >/dev/null; }
vectorizer_workers ""
python3 - "$WORK" <<'PY'
import sys
work = sys.argv[1]
line = "{i}\tPassage {i}: the harbour town wakes slowly on winter mornings while boats rock at the quay.\n"
with open(f"{work}/copy_10000.tsv", "w") as f:
    f.writelines(line.format(i=i) for i in range(1, 10001))
for k in range(40):
    with open(f"{work}/copy_250_{k}.tsv", "w") as f:
        f.writelines(line.format(i=i) for i in range(k * 250 + 1, (k + 1) * 250 + 1))
PY
chmod a+r "$WORK"/copy_*.tsv
"${PSQL[@]}" >/dev/null <<'SQL'
CREATE TABLE copy_plain (id int PRIMARY KEY, body text, embedding real[]);
CREATE TABLE copy_vectorized (LIKE copy_plain INCLUDING ALL);
SELECT nvembed_create_vectorizer('copy_vectorized', 'body', 'embedding');
SQL
# copy_ms FILE...: total server time (psql \timing) of COPYs of the files into copy_plain, then
# into copy_vectorized, as "plain vectorized"; empties both tables and the queue afterwards.
copy_ms() {
  { echo '\timing on'
    for table in copy_plain copy_vectorized; do for f in "$@"; do echo "COPY $table (id, body) FROM '$f';"; done; done
  } > "$sqlfile"
  "${PSQL[@]}" -f "$sqlfile" | awk -v n=$# '/^Time:/ {k++; if (k <= n) a += $2; else b += $2} END {printf "%.1f %.1f\n", a, b}'
  "${PSQL[@]}" -c "TRUNCATE copy_plain, copy_vectorized, nvembed_vectorizer_queue" >/dev/null
}
median_ratio() { python3 -c "import statistics, sys; r = [float(b) / float(a) for a, b in (x.split() for x in sys.argv[1:])]; print(round(statistics.median(r), 2))" "$@"; }
small=(); large=()
for _ in 1 2 3; do
  small+=("$(copy_ms "$WORK"/copy_250_{0..39}.tsv)")
  large+=("$(copy_ms "$WORK/copy_10000.tsv")")
done
row "vectorizer: COPY of 250 rows into a vectorized vs a plain table (40 COPYs, median of 3; last $(cut -d' ' -f2 <<<"${small[2]}") vs $(cut -d' ' -f1 <<<"${small[2]}") ms)" "$(median_ratio "${small[@]}")×" "≤ 3×"
row "vectorizer: COPY of 10,000 rows into a vectorized vs a plain table (median of 3; last $(cut -d' ' -f2 <<<"${large[2]}") vs $(cut -d' ' -f1 <<<"${large[2]}") ms)" "$(median_ratio "${large[@]}")×" "—"
"${PSQL[@]}" >/dev/null <<SQL
DROP TABLE copy_plain, copy_vectorized;
CREATE TABLE drain (id int PRIMARY KEY, body text, embedding real[]);
INSERT INTO drain SELECT g, 'Drained ' || g || '. ' || repeat('The harbour town wakes slowly on winter mornings while boats rock at the quay. ', 6)
FROM generate_series(1, $ROWS) g;
SQL
t0=$(now); "${PSQL[@]}" -c "SELECT count(*) FROM nvembed_passages(ARRAY(SELECT body FROM drain ORDER BY id))" >/dev/null; t1=$(now)
"${PSQL[@]}" -c "SELECT nvembed_create_vectorizer('drain', 'body', 'embedding')" >/dev/null
queue_empty() { [ "$("${PSQL[@]}" -Atc "SELECT pending + in_progress FROM nvembed_vectorizer_status WHERE tbl = 'drain'::regclass")" = 0 ]; }
t2=$(now); vectorizer_workers postgres
until queue_empty; do sleep 0.2; done
t3=$(now)
passages=$(calc "round($ROWS / ($t1-$t0), 2)"); drained=$(calc "round($ROWS / ($t3-$t2), 2)")
row "vectorizer: rows/s until pending = 0 vs one nvembed_passages call, $ROWS rows × ~100 tokens (medium; $drained vs $passages rows/s)" "$(calc "round($drained / $passages, 2)")×" "≥ 0.8×"
# Searches (one a second, after the first 3 s) while the queue drains again: every text changed.
"${PSQL[@]}" -c "UPDATE drain SET body = body || ' Again.'" >/dev/null
sleep 3; draining=()
until queue_empty; do draining+=("$(query_ms "draining ${#draining[@]}")"); sleep 1; done
if [ ${#draining[@]} -gt 0 ]; then
  drain_worst=$(worst "${draining[@]}")
  row "vectorizer: worst single-query latency while the queue drains vs idle (medium; $drain_worst vs $idle_worst ms, ${#draining[@]} queries)" "$(calc "round($drain_worst / $idle_worst, 2)")×" "≤ 2×"
fi

# Chunk vectorizers on the same rows: rows/s until drained vs the column vectorizer's above, with
# one chunk per row (the cutting, the chunk call and the chunk rows' writes alone) and with ~3
# overlapping chunks per row (each chunk ~40 tokens; the overlap adds tokens to embed).
chunk_drain() { # max_tokens overlap -> "rows/s chunks"
  vectorizer_workers ""
  "${PSQL[@]}" -c "SELECT nvembed_create_chunk_vectorizer('drain', 'body', 'drain_chunks', $1, $2)" >/dev/null
  local t0 t1; t0=$(now); vectorizer_workers postgres
  until [ "$("${PSQL[@]}" -Atc "SELECT pending + in_progress FROM nvembed_vectorizer_status WHERE chunk_table = 'drain_chunks'::regclass")" = 0 ]; do sleep 0.2; done
  t1=$(now)
  echo "$(calc "round($ROWS / ($t1-$t0), 2)") $("${PSQL[@]}" -Atc "SELECT count(*) FROM drain_chunks")"
  "${PSQL[@]}" -c "DROP TABLE drain_chunks" >/dev/null
}
read -r whole whole_chunks <<<"$(chunk_drain 512 0)"
row "chunk vectorizer: rows/s until drained vs the column vectorizer, one chunk per row (medium; $whole vs $drained rows/s, $whole_chunks chunks)" "$(calc "round($whole / $drained, 2)")×" "—"
read -r cut cut_chunks <<<"$(chunk_drain 48 8)"
row "chunk vectorizer: rows/s until drained vs the column vectorizer, 48-token chunks, overlap 8 (medium; $cut vs $drained rows/s, $cut_chunks chunks)" "$(calc "round($cut / $drained, 2)")×" "—"

# 5b. Backend RSS growth after 1000 calls.
growth=$("${PSQL[@]}" -At <<'SQL'
CREATE TEMP TABLE m AS SELECT (regexp_match(pg_read_file('/proc/' || pg_backend_pid() || '/status'), 'VmRSS:\s+(\d+)'))[1]::bigint AS kb;
DO $$ BEGIN FOR i IN 1..1000 LOOP PERFORM nvembed_query('question ' || i); END LOOP; END $$;
SELECT round(((regexp_match(pg_read_file('/proc/' || pg_backend_pid() || '/status'), 'VmRSS:\s+(\d+)'))[1]::bigint - kb) / 1024.0, 2) FROM m;
SQL
)
row "memory: backend RSS growth after 1000 calls (medium)" "$growth MB" "< 10 MB"
# 5c. bf16.
# The dtype is server-wide: a reload restarts the model server with it.
old_pid=$("${PSQL[@]}" -Atc "SELECT pid FROM nvembed_status()")
"${PSQL[@]}" -c "ALTER SYSTEM SET nvembed.dtype = 'bf16'" -c "SELECT pg_reload_conf()" >/dev/null
until [ "$("${PSQL[@]}" -Atc "SELECT dtype = 'bf16' AND pid <> $old_pid FROM nvembed_status()" 2>/dev/null)" = t ]; do sleep 0.2; done
"${PSQL[@]}" -c "SELECT nvembed_passage('bf16') IS NOT NULL" >/dev/null
row "memory: model process RSS after load ÷ weight bytes (medium, bf16)" "$(calc "round($(server_rss) / ($PARAMS * 2), 3)")" "≤ 1.15"
cluster_stop

mkdir -p bench
out="bench/results-$(date +%F).md"
{
  echo "# nvembed benchmark, $(date -u '+%F %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo). Command: \`make bench\` (BENCH_BULK_ROWS=$ROWS, BENCH_SECONDS=$SECONDS_PER_RUN). CPU flags: $(grep -ow 'avx2\|avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo
  echo "| workload | measured | target |"
  echo "|---|---|---|"
  printf '%s\n' "${TABLE[@]}"
  echo
  echo "## Compute (\`cargo bench -p nvembed-engine --bench compute\`)"
  echo
  echo "$COMPUTE"
  echo
  echo "## NV-Embed-v2's real widths (\`cargo bench -p nvembed-engine --bench real_shape\`)"
  echo
  echo "$REAL_SHAPE"
} > "$out"
cat "$out"
