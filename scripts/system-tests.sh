#!/usr/bin/env bash
# System tests that need a whole server: a restart with requests in flight, a load test of
# 16 sessions × 200 mixed calls, backfill progress, a model server of another build or one that
# misbehaves, a missing or wedged model server, a 100,000-text call, a vectorizer's queue
# drained through a killed model server and an immediate restart, logical replication, and
# OpenAI's Python client against a standalone model server over TLS. Run by `make test` after the
# SQL tests; bounded in time, loopback only, and they stop their cluster themselves. Each check
# prints PASS or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
trap cluster_stop EXIT
TINY=engine/tests/fixtures/nvembed-tiny-a
fail() { echo "FAIL: $*" >&2; exit 1; }
# Model servers of this cluster: children of its supervisor worker, a child of its postmaster.
server_pids() {
  local postmaster; postmaster=$(head -n1 "$WORK/data/postmaster.pid" 2>/dev/null || echo 0)
  for p in $(pgrep -f 'nvembed-model-server --socket' || true); do
    local parent; parent=$(ps -o ppid= -p "$p" | tr -d ' ')
    [ -n "$parent" ] && [ "$(ps -o ppid= -p "$parent" | tr -d ' ')" = "$postmaster" ] && echo "$p"
  done
  return 0
}

install_nvembed
cluster_start "$TINY"

# 0. Search at NV-Embed-v2's width: 4,096-dim vectors (random: no model is loaded yet, so the
#    column's dimension is not held against the tiny model's), a centred index, and a search
#    through it equal to exact search when every row is a candidate.
search=$("${PSQL[@]}" -At <<'SQL'
CREATE EXTENSION vector;
CREATE EXTENSION nvembed;
SELECT nvembed_model_dimension() IS NULL AS no_model_yet;
CREATE TABLE wide (id int PRIMARY KEY, e vector(4096));
INSERT INTO wide SELECT i, (SELECT array_agg(random() - 0.4) FROM generate_series(1, 4096) WHERE i > 0)::real[]::vector
FROM generate_series(1, 1500) i;
ANALYZE wide;
SELECT nvembed_create_search_index('wide', centred => true) IS NOT NULL;
CREATE TABLE q AS SELECT (SELECT array_agg(random() - 0.4) FROM generate_series(1, 4096))::real[] AS v;
BEGIN;
SET LOCAL enable_seqscan = off;
SELECT (SELECT array_agg((s.item).id ORDER BY s.score DESC) FROM nvembed_search(NULL::wide, (SELECT v FROM q), 10, candidates => 1500) s)
     = (SELECT array_agg(id) FROM (SELECT id FROM wide ORDER BY e <#> (SELECT v FROM q)::vector LIMIT 10) x);
SELECT pg_stat_get_xact_numscans(s.index) FROM nvembed_search_index('wide', 'e', 4096) s;
COMMIT;
DROP TABLE wide, q;
DROP FUNCTION wide_e_centre();
SQL
)
[ "$(echo $search)" = "t t t 1" ] || fail "search of 4,096-dim vectors (no model yet, index made, equal to exact, index scans): $search"
echo "PASS search at 4,096 dimensions: centred index made (its centre a function: a constant would not fit pg_index), search through it equals exact search"
"${PSQL[@]}" -c "SELECT nvembed_passage('warm up') IS NOT NULL" >/dev/null

# 1. pg_ctl restart -m fast with calls in flight.
long=$(python3 -c "print('The lighthouse beam sweeps across the water in slow, steady circles. ' * 2000)")
pids=()
for i in 1 2 3; do
  "${PSQL[@]}" -c "SELECT nvembed_passage('$long $i') IS NOT NULL" >/dev/null 2>&1 & pids+=($!)
done
sleep 0.5
old_server=$(server_pids)
# -l again: without it the restarted server logs elsewhere, and later checks read this log.
"${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -m fast -w restart >/dev/null
for p in "${pids[@]}"; do wait "$p" && fail "a call in flight survived a fast restart"; done
"${PSQL[@]}" -c "SELECT nvembed_passage('after restart') IS NOT NULL" >/dev/null || fail "no call after restart"
for p in $old_server; do [ -d "/proc/$p" ] && fail "model server $p of the old instance still runs"; done
[ "$(server_pids | wc -w)" = 1 ] || fail "expected exactly one model server, found: $(server_pids)"
echo "PASS restart -m fast with 3 calls in flight: they error, no stray process, next call works"

# 2. Load: 16 sessions × 200 calls, 1 to ~2000 tokens, query / passage / batch functions.
"${PSQL[@]}" >/dev/null <<'SQL'
CREATE TABLE load_texts (id int PRIMARY KEY, body text);
-- 1 token up to ~2,000 tokens, geometrically spaced (most real texts are short).
INSERT INTO load_texts SELECT g, CASE WHEN g = 1 THEN 'x' ELSE repeat('harbour ' || g || ' boats. ', round(power(1.155, g))::int) END
FROM generate_series(1, 40) g;
CREATE TABLE reference AS
  SELECT id, nvembed_query(body) AS q, nvembed_passage(body) AS p FROM load_texts;
CREATE UNLOGGED TABLE results (id int, kind text, e real[]);
SQL
cat > "$WORK/load.sql" <<'SQL'
\set id random(1, 40)
\set kind random(1, 3)
\if :kind = 1
INSERT INTO results SELECT :id, 'q', nvembed_query(body) FROM load_texts WHERE id = :id;
\elif :kind = 2
INSERT INTO results SELECT :id, 'p', nvembed_passage(body) FROM load_texts WHERE id = :id;
\else
INSERT INTO results SELECT :id, 'p', e FROM nvembed_passages(ARRAY(SELECT body FROM load_texts WHERE id = :id)) e;
\endif
SQL
chmod a+r "$WORK/load.sql"
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$(server_pids)/status"; }
rss_before=$(rss)
(cd "$WORK" && "${PGBENCH[@]}" -n -f "$WORK/load.sql" -c 16 -j 4 -t 200 -l --log-prefix="$WORK/lat" postgres > "$WORK/pgbench.out" 2>&1) \
  || { cat "$WORK/pgbench.out"; fail "pgbench reported errors"; }
grep -q "number of failed transactions: 0" "$WORK/pgbench.out" || { cat "$WORK/pgbench.out"; fail "failed transactions"; }
rss_after=$(rss)
counts=$("${PSQL[@]}" -Atc "SELECT count(*), count(*) FILTER (WHERE
    (SELECT max(abs(a - b)) FROM unnest(r.e, CASE r.kind WHEN 'q' THEN f.q ELSE f.p END) u(a, b)) <= 1e-6)
  FROM results r JOIN reference f USING (id)")
[ "$counts" = "3200|3200" ] || fail "results equal to the single-session ones: $counts (of 3200)"
latency=$(cat "$WORK"/lat.* | python3 -c "
import sys
lat = sorted(int(line.split()[2]) / 1000 for line in sys.stdin)
print(f'p50 {lat[len(lat) // 2]:.1f} ms, p99 {lat[int(len(lat) * 0.99)]:.1f} ms')")
# A leak of activations would grow it by far more; allow 5 % or 8 MB (thread stacks, allocator).
python3 -c "import sys; b, a = $rss_before, $rss_after; sys.exit(0 if a <= max(b * 1.05, b + 8192) else 1)" \
  || fail "model process RSS grew from $rss_before kB to $rss_after kB"
echo "PASS load: 16 sessions × 200 calls, 0 errors, 3200/3200 vectors equal to single-session results, $latency, model RSS $rss_before → $rss_after kB"

# 3. Backfill NOTICEs: at most one progress line per ~2 s (not one per batch), true final counts
#    with a row that another session holds locked throughout.
"${PSQL[@]}" -c "CREATE TABLE bf (id int PRIMARY KEY, body text, embedding real[])" \
  -c "INSERT INTO bf SELECT g, 'backfilled row ' || g FROM generate_series(1, 4000) g" >/dev/null
"${PSQL[@]}" -c "BEGIN" -c "SELECT 1 FROM bf WHERE id = 7 FOR UPDATE" -c "SELECT pg_sleep(600)" >/dev/null 2>&1 &
locker=$!
for _ in $(seq 100); do
  [ "$("${PSQL[@]}" -Atc "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)'")" = 1 ] && break
  sleep 0.1
done
started=$(date +%s.%N)
notices=$("${PSQL[@]}" -c "CALL nvembed_backfill('bf', 'body', 'embedding', batch_size => 1)" 2>&1)
elapsed=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")
"${PSQL[@]}" -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)'" >/dev/null
wait "$locker" || true
progress=$(grep -c ' embedded, .* rows/s' <<<"$notices" || true)
python3 -c "import sys; e, p = $elapsed, $progress; sys.exit(0 if 1 <= p <= e / 2 + 1 else 1)" \
  || { echo "$notices"; fail "$progress progress NOTICEs in $elapsed s for 4000 batches (want 1 ≤ n ≤ elapsed / 2 + 1)"; }
grep -q 'done in .* s: 3999 rows embedded, 1 skipped (locked by another session), 0 skipped (changed, deleted or filled meanwhile); 1 rows with a non-NULL body still have a NULL embedding' <<<"$notices" \
  || { echo "$notices"; fail "final NOTICE of the backfill"; }
echo "PASS backfill NOTICEs: $progress progress lines in $elapsed s (4000 batches), final counts 3999 embedded / 1 locked / 1 left NULL"

# Sections 4-7 replace the model server executable; put the real one back however they end.
PKGLIB=$("$PG_CONFIG" --pkglibdir)
REAL_SERVER="$WORK/real-model-server"
cp "$PKGLIB/nvembed-model-server" "$REAL_SERVER"
restore_server() { [ -f "$REAL_SERVER" ] && $SUDO install -m 755 "$REAL_SERVER" "$PKGLIB/nvembed-model-server"; cluster_stop; }
trap restore_server EXIT
reload() { "${PSQL[@]}" -c "$1" -c "SELECT pg_reload_conf()" >/dev/null; }
# expect_error SQL SQLSTATE TEXT: the call fails with that SQLSTATE and TEXT in its message
# (retried for up to 10 s while the supervisor restarts the server).
expect_error() {
  local out
  for _ in $(seq 100); do
    out=$("${PSQL[@]}" -v VERBOSITY=verbose -c "$1" 2>&1 || true)
    if grep -qF "$3" <<<"$out"; then
      grep -q "ERROR:  $2:" <<<"$out" || fail "expected SQLSTATE $2: $out"
      echo "$out"; return 0
    fi
    sleep 0.1
  done
  fail "expected an error containing '$3', got: $out"
}
wait_for_call() {
  for _ in $(seq 600); do
    "${PSQL[@]}" -c "SELECT nvembed_passage('are you back?') IS NOT NULL" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "no call worked within 60 s"
}

# 4. A model server from another build is refused with a clear ERROR; a server that returns
#    fewer vectors than texts is an ERROR, never missing rows.
$SUDO install -m 755 scripts/testing/fake-model-server.py "$PKGLIB/nvembed-model-server"
reload "ALTER SYSTEM SET nvembed.model = 'other-build'"
out=$(expect_error "SELECT nvembed_passage('x')" 58000 "come from different builds")
grep -q "HINT:  Reinstall nvembed" <<<"$out" || fail "no reinstall hint: $out"
reload "ALTER SYSTEM SET nvembed.model = 'fewer-vectors'"
expect_error "SELECT count(*) FROM nvembed_passages(ARRAY['a', 'b', 'c'])" XX000 "returned 2 vectors for 3 texts" >/dev/null
$SUDO install -m 755 "$REAL_SERVER" "$PKGLIB/nvembed-model-server"
reload "ALTER SYSTEM RESET nvembed.model"
wait_for_call
echo "PASS another build: 58000 \"come from different builds\" + reinstall hint; fewer vectors than texts: XX000"

# 5. A missing executable is named once in the log, not at every retry; the server comes back
#    by itself once it is installed again.
$SUDO rm "$PKGLIB/nvembed-model-server"
kill -9 "$(server_pids)"
sleep 4
missing=$(grep -c "nvembed-model-server is missing" "$WORK/server.log" || true)
[ "$missing" = 1 ] || fail "the missing executable was logged $missing times in 4 s (want once)"
$SUDO install -m 755 "$REAL_SERVER" "$PKGLIB/nvembed-model-server"
wait_for_call
echo "PASS missing executable: one log line naming it in 4 s of retries; back by itself after reinstall"

# 6. A wedged server (stopped, answering nothing) is killed and replaced by the liveness check.
wedged=$(server_pids)
kill -STOP "$wedged"
started=$(date +%s)
while [ "$(server_pids)" = "$wedged" ]; do
  [ $(( $(date +%s) - started )) -lt 45 ] || fail "the wedged server $wedged was not replaced in 45 s"
  sleep 0.5
done
wait_for_call
grep -q "did not answer 3 status checks in a row; killing it" "$WORK/server.log" || fail "no liveness log line"
echo "PASS wedged server: replaced after $(( $(date +%s) - started )) s, next call works"

# 7. 100,000 texts in one call: refused up front by the default nvembed.max_request_tokens;
#    with the limit raised, 100,000 rows stream back with bounded memory on both sides.
big="SELECT count(*), count(e) FROM nvembed_passages(ARRAY(SELECT 'text ' || g FROM generate_series(1, 100000) g)) e"
expect_error "$big" 54000 "more than nvembed.max_request_tokens (262144)" >/dev/null
reload "ALTER SYSTEM SET nvembed.max_request_tokens = 2000000"
server=$(server_pids)
result=$("${PSQL[@]}" -At <<SQL
$big;
SELECT (regexp_match(pg_read_file('/proc/' || pg_backend_pid() || '/status'), 'VmHWM:\s+(\d+)'))[1];
SQL
)
[ "$(head -n1 <<<"$result")" = "100000|100000" ] || fail "100,000 texts gave: $result"
backend_kb=$(tail -n1 <<<"$result")
server_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$server/status")
[ "$backend_kb" -lt 200000 ] || fail "the backend peaked at $backend_kb kB"
echo "PASS 100,000 texts: refused with 54000 by default; with the limit raised 100000 rows, backend peak $backend_kb kB, model server peak $server_kb kB"

# 8. Vectorizer under faults: SIGKILL of the model server and `pg_ctl restart -m immediate`
#    while a queue drains lose nothing and write nothing twice; draining resumes by itself. A
#    chunk vectorizer of the same rows drains through the same faults: every row's chunks are
#    exactly those of its text, each with its text's embedding, none twice. A
#    listed database without the extension is logged once; a worker that exits is restarted.
"${PSQL[@]}" -c "CREATE DATABASE vz_noext" >/dev/null
reload "ALTER SYSTEM SET nvembed.vectorizer_databases = 'postgres, vz_noext'"
listed=$(date +%s)
"${PSQL[@]}" >/dev/null <<'SQL'
CREATE TABLE vz_fault (id int PRIMARY KEY, body text, embedding real[]);
-- Every write of a vector, with the text the row had then.
CREATE TABLE vz_fault_writes (id int, body text, embedding real[]);
CREATE FUNCTION vz_fault_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO vz_fault_writes VALUES (NEW.id, NEW.body, NEW.embedding); RETURN NEW; END $$;
CREATE TRIGGER vz_fault_log AFTER UPDATE OF embedding ON vz_fault FOR EACH ROW EXECUTE FUNCTION vz_fault_log();
SELECT nvembed_create_vectorizer('vz_fault', 'body', 'embedding');
SELECT nvembed_create_chunk_vectorizer('vz_fault', 'body', 'vz_fault_chunks', 96, 16);
-- Every write of a chunk.
CREATE TABLE vz_fault_chunk_writes (id int, chunk_seq int);
CREATE FUNCTION vz_fault_chunk_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO vz_fault_chunk_writes VALUES (NEW.id, NEW.chunk_seq); RETURN NEW; END $$;
CREATE TRIGGER vz_fault_chunk_log AFTER INSERT ON vz_fault_chunks FOR EACH ROW EXECUTE FUNCTION vz_fault_chunk_log();
-- 640 texts of ~300 tokens: 10 batches of 64, seconds each.
INSERT INTO vz_fault SELECT g, repeat('fault tolerant text ' || g || '. ', 50) FROM generate_series(1, 640) g;
SQL
vz_status() { "${PSQL[@]}" -At -c "SELECT concat_ws(',', sum(pending), sum(in_progress), min(embedded)) FROM nvembed_vectorizer_status WHERE tbl = 'vz_fault'::regclass" 2>/dev/null || true; }
# wait_until SECONDS CONDITION-ON-$in_progress/$embedded/$pending
wait_until() {
  local limit=$1 started; started=$(date +%s); shift
  while :; do
    IFS=, read -r pending in_progress embedded <<<"$(vz_status)"
    pending=${pending:-x} in_progress=${in_progress:-0} embedded=${embedded:-0}
    eval "$1" && return 0
    [ $(( $(date +%s) - started )) -lt "$limit" ] || fail "vectorizer: not ($1) within $limit s (pending,in_progress,embedded = $(vz_status))"
    sleep 0.2
  done
}
wait_until 60 '[ "$embedded" -ge 64 ] && [ "$in_progress" -gt 0 ]'
before=$embedded
kill -9 "$(server_pids)"
wait_until 60 '[ "$embedded" -gt "$before" ] && [ "$in_progress" -gt 0 ]'
before=$embedded
# (Its worker has polled for the extension every second since the reload.)
noext=$(grep -c 'database "vz_noext" is listed in nvembed.vectorizer_databases but has no nvembed extension' "$WORK/server.log" || true)
[ "$noext" = 1 ] || fail "a listed database without the extension was logged $noext times (want once)"
noext_seconds=$(( $(date +%s) - listed ))
"${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -m immediate -w restart >/dev/null
wait_until 180 '[ "$pending" = 0 ] && [ "$in_progress" = 0 ]'
result=$("${PSQL[@]}" -At <<'SQL'
WITH a AS (SELECT array_agg(id ORDER BY id) AS ids, array_agg(body ORDER BY id) AS bodies FROM vz_fault GROUP BY id / 100),
     expected AS (SELECT a.ids[p.n] AS id, p.e FROM a, nvembed_passages(a.bodies) WITH ORDINALITY AS p(e, n))
SELECT (SELECT count(*) FROM vz_fault f JOIN expected x USING (id)
        WHERE (SELECT max(abs(p - q)) FROM unnest(f.embedding, x.e) u(p, q)) <= 1e-6)
       || ',' || (SELECT count(*) || ',' || count(DISTINCT id) FROM vz_fault_writes)
       || ',' || (SELECT count(*) FROM vz_fault_writes w JOIN vz_fault f USING (id) WHERE w.body IS DISTINCT FROM f.body OR w.embedding IS DISTINCT FROM f.embedding)
SQL
)
[ "$result" = "640,640,640,0" ] || fail "vectorizer after SIGKILL and immediate restart: correct,writes,rows written,stale writes = $result (want 640,640,640,0)"
chunks=$("${PSQL[@]}" -At <<'SQL'
WITH c AS (SELECT id, chunk_seq, chunk, embedding::real[] AS e, row_number() OVER (ORDER BY id, chunk_seq) AS r FROM vz_fault_chunks),
     g AS (SELECT array_agg(r ORDER BY r) AS rs, array_agg(chunk ORDER BY r) AS chunks FROM c GROUP BY r / 200),
     x AS (SELECT g.rs[p.n] AS r, p.e FROM g, nvembed_passages(g.chunks) WITH ORDINALITY AS p(e, n))
SELECT (SELECT count(*) FROM vz_fault d
        WHERE (SELECT array_agg(c.chunk_seq || ':' || c.chunk ORDER BY c.chunk_seq) FROM vz_fault_chunks c WHERE c.id = d.id)
              = (SELECT array_agg(x.chunk_seq || ':' || x.chunk ORDER BY x.chunk_seq) FROM nvembed_chunks(d.body, 96, 16) x))
       || ',' || (SELECT count(*) FROM c JOIN x USING (r) WHERE (SELECT max(abs(p - q)) FROM unnest(c.e, x.e) u(p, q)) <= 1e-6)
       || ',' || (SELECT count(*) FROM vz_fault_chunks)
       || ',' || (SELECT count(*) - count(DISTINCT (id, chunk_seq)) FROM vz_fault_chunk_writes)
SQL
)
IFS=, read -r rows_ok chunks_ok chunk_count rewritten <<<"$chunks"
[ "$rows_ok" = 640 ] && [ "$chunks_ok" = "$chunk_count" ] && [ "$chunk_count" -gt 640 ] && [ "$rewritten" = 0 ] \
  || fail "chunk vectorizer after SIGKILL and immediate restart: rows with their text's chunks, chunks with their embedding, chunks, chunks written twice = $chunks"
echo "PASS vectorizer under faults: model server SIGKILLed at $before rows, immediate restart mid-batch; all 640 rows correct, each written once; their $chunk_count chunks exactly their texts' and each written once"

worker() { "${PSQL[@]}" -At -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'nvembed vectorizer' AND datname = 'postgres'"; }
old_worker=$(worker)
[ -n "$old_worker" ] || fail "no vectorizer worker runs in database postgres"
"${PSQL[@]}" -c "SELECT pg_terminate_backend($old_worker)" >/dev/null
for _ in $(seq 100); do
  new_worker=$(worker)
  [ -n "$new_worker" ] && [ "$new_worker" != "$old_worker" ] && break
  sleep 0.1
done
[ -n "$new_worker" ] && [ "$new_worker" != "$old_worker" ] || fail "the terminated vectorizer worker was not restarted in 10 s"
"${PSQL[@]}" -c "UPDATE vz_fault SET body = 'after the worker restart' WHERE id = 1" >/dev/null
wait_until 30 '[ "$pending" = 0 ] && [ "$in_progress" = 0 ]'
ok=$("${PSQL[@]}" -At -c "SELECT (SELECT max(abs(p - q)) FROM unnest(embedding, nvembed_passage(body)) u(p, q)) <= 1e-6 FROM vz_fault WHERE id = 1")
[ "$ok" = t ] || fail "the restarted worker did not embed the changed row"
echo "PASS vectorizer workers: a database without the extension logged once in $noext_seconds s; a terminated worker restarted (pid $old_worker -> $new_worker) and drains"

# 9. Logical replication: a vectorizer on a subscriber embeds what the apply worker writes (it
#    fires row triggers only: nvembed's replica insert and update triggers), into a plain and a
#    partitioned table, rows moved between partitions included. The subscriber's database is
#    listed before it exists: logged once, and its worker starts when it is created.
cluster_stop
cluster_start "$TINY" "wal_level = logical" "nvembed.vectorizer_databases = 'sub'"
sleep 6 # (the supervisor looks for a missing database every 5 s)
"${PSQL[@]}" -c "CREATE DATABASE pub" -c "CREATE DATABASE sub" >/dev/null
"${PSQL[@]}" -d pub >/dev/null <<'SQL'
CREATE TABLE docs (id int PRIMARY KEY, body text, e real[]);
CREATE TABLE parts (id int, part int, body text, e real[], PRIMARY KEY (part, id));
CREATE PUBLICATION pub FOR TABLE docs, parts;
SELECT pg_create_logical_replication_slot('sub', 'pgoutput');
SQL
"${PSQL[@]}" -d sub >/dev/null <<SQL
CREATE EXTENSION nvembed;
CREATE TABLE docs (id int PRIMARY KEY, body text, e real[]);
CREATE TABLE parts (id int, part int, body text, e real[], PRIMARY KEY (part, id)) PARTITION BY LIST (part);
CREATE TABLE parts_1 PARTITION OF parts FOR VALUES IN (1);
CREATE TABLE parts_2 PARTITION OF parts FOR VALUES IN (2);
SELECT nvembed_create_vectorizer('docs', 'body', 'e');
SELECT nvembed_create_vectorizer('parts', 'body', 'e');
CREATE SUBSCRIPTION sub CONNECTION 'host=$WORK port=$PORT dbname=pub user=postgres' PUBLICATION pub
    WITH (create_slot = false, slot_name = 'sub');
SQL
"${PSQL[@]}" -d pub >/dev/null <<'SQL'
INSERT INTO docs SELECT g, 'replicated row ' || g FROM generate_series(1, 20) g;
INSERT INTO parts SELECT g, 1 + g % 2, 'replicated part row ' || g FROM generate_series(1, 10) g;
UPDATE docs SET body = 'replicated and changed ' || id WHERE id <= 5;
UPDATE docs SET id = id + 100, body = upper(body) WHERE id BETWEEN 6 AND 8;
DELETE FROM docs WHERE id = 20;
UPDATE parts SET part = 3 - part, body = body || ', moved' WHERE id <= 4;
SQL
sub_state() {
  "${PSQL[@]}" -d sub -At <<'SQL' 2>/dev/null || true
SELECT (SELECT count(*) FROM docs) || ',' || (SELECT count(*) FROM parts) || ',' ||
       (SELECT count(*) FROM (SELECT body, e FROM docs UNION ALL SELECT body, e FROM parts) r
        WHERE (SELECT max(abs(x - y)) FROM unnest(r.e, nvembed_passage(r.body)) u(x, y)) <= 1e-6) || ',' ||
       (SELECT sum(pending + in_progress) FROM nvembed_vectorizer_status)
SQL
}
started=$(date +%s)
until [ "$(sub_state)" = "19,10,29,0" ]; do
  [ $(( $(date +%s) - started )) -lt 60 ] || fail "logical replication: docs,parts,correct,queued = $(sub_state) (want 19,10,29,0)"
  sleep 0.5
done
missing=$(grep -c 'database "sub" listed in nvembed.vectorizer_databases does not exist' "$WORK/server.log" || true)
fatal=$(grep -c 'FATAL:  database "sub" does not exist' "$WORK/server.log" || true)
[ "$missing" = 1 ] && [ "$fatal" = 0 ] || fail "a listed database that does not exist yet: logged $missing times, $fatal FATALs (want 1, 0)"
"${PSQL[@]}" -d sub -c "DROP SUBSCRIPTION sub" >/dev/null
echo "PASS logical replication: a subscriber's vectorizer embeds replicated inserts, updates, key changes and partition moves (29 rows correct); its database, listed before it existed, was logged once"

# 10. A standalone model server (HTTP over TLS, a token) used by OpenAI's Python client from
#     PyPI: the same vectors as nvembed_passage / nvembed_query (≤ 1e-6), float and base64;
#     a wrong token and `dimensions` refused in OpenAI's shape; /health and /metrics by curl.
OPENAI_VERSION=3.57.0
venv="${NVEMBED_TEST_VENV:-/tmp/nvembed-test/venv}"
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "openai==$OPENAI_VERSION"
fi
tls="$WORK/tls"; mkdir -p "$tls"
test_certificates "$tls" localhost
token=$(openssl rand -hex 24)
printf 'system-test %s\n' "$token" > "$tls/tokens"
port=$(free_port)
target/release/nvembed-model-server --model "$TINY" --dtype f32 --served-model-name nv-embed-tiny \
  --http-listen "127.0.0.1:$port" --tls-cert "$tls/localhost.crt" --tls-key "$tls/localhost.key" \
  --tokens-file "$tls/tokens" 2> "$WORK/http-server.log" &
http_server=$!
trap 'kill $http_server 2>/dev/null || true; restore_server' EXIT
for _ in $(seq 100); do
  curl -sf --cacert "$tls/ca.crt" "https://localhost:$port/health" >/dev/null && break
  sleep 0.1
done
health=$(curl -sS --cacert "$tls/ca.crt" "https://localhost:$port/health")
[ "$health" = '{"loaded":false,"status":"ok"}' ] || fail "/health answered $health"
texts='["The lighthouse beam sweeps across the water.", "Boats at sea", "où est le phare ?", ""]'
got=$("$venv/bin/python" scripts/testing/openai-client.py "https://localhost:$port/v1" "$token" "$tls/ca.crt" nv-embed-tiny <<<"$texts")
want=$("${PSQL[@]}" -d sub -At -c "SELECT json_build_object(
    'passage', (SELECT json_agg(nvembed_passage(t) ORDER BY n) FROM json_array_elements_text('$texts') WITH ORDINALITY AS u(t, n)),
    'query', nvembed_query('The lighthouse beam sweeps across the water.'))")
python3 - "$got" "$want" <<'PY' || fail "OpenAI's client: $got"
import json, sys
got, want = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def diff(a, b):
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))
worst = max(diff(g, w) for key in ("passage_float", "passage_default") for g, w in zip(got[key], want["passage"]))
worst = max(worst, diff(got["query"], want["query"]))
assert worst <= 1e-6, worst
assert got["wrong_token"] == [401, "invalid_api_key"], got["wrong_token"]
assert got["dimensions"] == [400, "dimensions_not_supported"], got["dimensions"]
assert got["prompt_tokens"] > 4, got["prompt_tokens"]
PY
metrics=$(curl -sS --cacert "$tls/ca.crt" -H "Authorization: Bearer $token" "https://localhost:$port/metrics")
grep -q '^nvembed_rows_total{class="bulk"} 8$' <<<"$metrics" || fail "/metrics: $metrics"
grep -q '^nvembed_rows_total{class="interactive"} 1$' <<<"$metrics" || fail "/metrics: $metrics"
unauthorized=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$tls/ca.crt" "https://localhost:$port/metrics")
[ "$unauthorized" = 401 ] || fail "/metrics without a token answered $unauthorized"
grep -q "refusing a request from 127.0.0.1:[0-9]*: missing or unknown bearer token" "$WORK/http-server.log" \
  || fail "the refused token was not logged with its peer: $(cat "$WORK/http-server.log")"
! grep -q "not-a-token-of-this-server\|$token" "$WORK/http-server.log" || fail "a token appears in the log"
kill $http_server
echo "PASS OpenAI's Python client $OPENAI_VERSION over TLS: float and base64 vectors equal nvembed_passage / nvembed_query (≤ 1e-6); wrong token 401, dimensions 400; /health, /metrics; no token in the log"
