#!/usr/bin/env bash
# System tests that need a whole server: a restart with requests in flight, and a load test of
# 16 sessions × 200 mixed calls. Run by `make test` after the SQL tests; bounded in time,
# loopback only, and they stop their cluster themselves. Each check prints PASS or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
trap cluster_stop EXIT
TINY=engine/tests/fixtures/nvembed-tiny-a
fail() { echo "FAIL: $*" >&2; exit 1; }
# Model servers of this cluster: children of its supervisor worker, a child of its postmaster.
server_pids() {
  local postmaster; postmaster=$(head -n1 "$WORK/data/postmaster.pid" 2>/dev/null || echo 0)
  for p in $(pgrep -f 'nvembed-model-server serve' || true); do
    local parent; parent=$(ps -o ppid= -p "$p" | tr -d ' ')
    [ -n "$parent" ] && [ "$(ps -o ppid= -p "$parent" | tr -d ' ')" = "$postmaster" ] && echo "$p"
  done
  return 0
}

install_nvembed
cluster_start "$TINY"
"${PSQL[@]}" -c "CREATE EXTENSION nvembed" -c "SELECT nvembed_passage('warm up') IS NOT NULL" >/dev/null

# 1. pg_ctl restart -m fast with calls in flight.
long=$(python3 -c "print('The lighthouse beam sweeps across the water in slow, steady circles. ' * 2000)")
pids=()
for i in 1 2 3; do
  "${PSQL[@]}" -c "SELECT nvembed_passage('$long $i') IS NOT NULL" >/dev/null 2>&1 & pids+=($!)
done
sleep 0.5
old_server=$(server_pids)
"${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/data" -m fast -w restart >/dev/null
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
python3 -c "import sys; b, a = $rss_before, $rss_after; sys.exit(0 if a <= b * 1.05 else 1)" \
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
