#!/usr/bin/env bash
# Remote model servers (part of `make bench`; runs alone too). Prints table rows
# (workload | measured | target) on stdout, progress on stderr:
# - a single query on the tiny model through a remote server in TLS over loopback vs the
#   cluster's own server on its Unix socket (median extra per call);
# - a vectorizer's drain rate with two servers of `--threads 1` vs one (medium checkpoint);
# - /v1/embeddings with 1,000 texts vs the same texts through nvembed_passages and the native
#   protocol, one server (medium checkpoint).
# BENCH_QUERIES (default 300) and BENCH_DRAIN_ROWS (default 240) shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
QUERIES=${BENCH_QUERIES:-300}
DRAIN_ROWS=${BENCH_DRAIN_ROWS:-240}
TINY=engine/tests/fixtures/nvembed-tiny-a
MEDIUM=target/nvembed-bench/medium
SERVER=target/release/nvembed-model-server
calc() { python3 -c "print($1)"; }
row() { echo "| $1 | $2 | $3 |"; echo "| $1 | $2 | $3 |" >&2; }
PIDS=()
TLS=$(mktemp -d /tmp/nvembed-bench-remote.XXXXXX)
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; cluster_stop; rm -rf "$TLS"; }
trap cleanup EXIT

[ -f "$MEDIUM/config.json" ] || cargo bench -q -p nvembed-engine --bench medium -- --generate >&2
chmod 755 "$TLS"
cp -r "$MEDIUM" "$TLS/medium"
test_certificates "$TLS" localhost
token=$(openssl rand -hex 24)
printf 'bench %s\n' "$token" > "$TLS/tokens"
printf '%s\n' "$token" > "$TLS/token"
[ "$(id -u)" = 0 ] && chown postgres "$TLS/token"
chmod 600 "$TLS/token"
# serve MODEL NAME PORT [ARGS...]: a server in TLS on PORT, once it listens.
serve() {
  local model=$1 name=$2 port=$3; shift 3
  "$SERVER" --model "$model" --served-model-name "$name" --dtype f32 --listen "127.0.0.1:$port" \
    --tls-cert "$TLS/localhost.crt" --tls-key "$TLS/localhost.key" --tokens-file "$TLS/tokens" "$@" 2>>"$TLS/servers.log" &
  PIDS+=($!)
  for _ in $(seq 600); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server on $port did not listen: $(cat "$TLS/servers.log")" >&2; exit 1
}
stop_servers() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }
reload() { "${PSQL[@]}" -c "$1" -c "SELECT pg_reload_conf()" >/dev/null; sleep 0.5; }
# timed SIDE ROUND N: N distinct nvembed_query calls in one session, each timed inside the
# backend, recorded in table latency.
timed() {
  "${PSQL[@]}" -At >/dev/null <<SQL
DO \$\$ DECLARE t0 timestamptz; BEGIN
  FOR i IN 1..$3 LOOP
    t0 := clock_timestamp();
    PERFORM nvembed_query('how far does the lighthouse beam reach, question ' || i || ' of $1 $2');
    INSERT INTO latency VALUES ('$1', extract(epoch FROM clock_timestamp() - t0) * 1000);
  END LOOP;
END \$\$;
SQL
}
median_ms() {
  "${PSQL[@]}" -At -c "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3) FROM latency WHERE side = '$1'"
}

install_nvembed >&2
# 1. Single query, tiny model: the cluster's own server, then one remote server in TLS, in
# alternating rounds (drift of a shared 2-core machine falls on both). One compute thread each,
# so the backend and the server's connection thread are not starved by compute threads.
P1=$(free_port)
serve "$TINY" nvembed-tiny-a "$P1" --threads 1
cluster_start "$TINY" "nvembed.dtype = 'f32'" "nvembed.threads = 1" \
  "nvembed.server_token_file = '$TLS/token'" "nvembed.server_ca_file = '$TLS/ca.crt'"
"${PSQL[@]}" -c "CREATE EXTENSION nvembed" -c "CREATE TABLE latency (side text, ms float8)" >/dev/null
ROUNDS=3
for round in $(seq $ROUNDS); do
  reload "ALTER SYSTEM RESET nvembed.servers"
  reload "ALTER SYSTEM RESET nvembed.model"
  "${PSQL[@]}" -c "SELECT nvembed_query('warm up') IS NOT NULL" >/dev/null
  timed local "$round" $((QUERIES / ROUNDS))
  # The remote server announces the name the cluster expects.
  reload "ALTER SYSTEM SET nvembed.model = 'nvembed-tiny-a'"
  reload "ALTER SYSTEM SET nvembed.servers = 'localhost:$P1'"
  "${PSQL[@]}" -c "SELECT nvembed_query('warm up') IS NOT NULL" >/dev/null
  timed remote "$round" $((QUERIES / ROUNDS))
done
local_ms=$(median_ms local); remote_ms=$(median_ms remote)
row "single query, tiny model: remote server in TLS over loopback vs the local Unix socket (median of $QUERIES, $ROUNDS alternating rounds)" \
  "$remote_ms ms vs $local_ms ms: +$(calc "round($remote_ms - $local_ms, 3)") ms" "≤ +1 ms"
stop_servers
cluster_stop

# 2. Drain rate, medium checkpoint: one server of --threads 1, then two.
PA=$(free_port); PB=$(free_port)
serve "$TLS/medium" bench-medium "$PA" --threads 1
serve "$TLS/medium" bench-medium "$PB" --threads 1
cluster_start bench-medium "nvembed.dtype = 'f32'" "nvembed.servers = 'localhost:$PA'" \
  "nvembed.server_token_file = '$TLS/token'" "nvembed.server_ca_file = '$TLS/ca.crt'" \
  "nvembed.vectorizer_databases = 'postgres'" "nvembed.vectorizer_batch_rows = 16"
"${PSQL[@]}" >/dev/null <<'SQL'
CREATE EXTENSION nvembed;
CREATE TABLE drain (id int PRIMARY KEY, body text, embedding real[]);
SELECT nvembed_create_vectorizer('drain', 'body', 'embedding');
SQL
# drain_rate FIRST LAST: rows per second from inserting rows FIRST..LAST (~100 tokens each)
# until the queue is empty.
drain_rate() {
  local t0 t1
  t0=$(date +%s.%N)
  "${PSQL[@]}" -c "INSERT INTO drain SELECT g, repeat('the keeper of light number ' || g || ' ', 12) FROM generate_series($1, $2) g" >/dev/null
  until [ "$("${PSQL[@]}" -At -c "SELECT pending = 0 AND in_progress = 0 FROM nvembed_vectorizer_status WHERE tbl = 'drain'::regclass")" = t ]; do
    sleep 0.1
  done
  t1=$(date +%s.%N)
  calc "round(($2 - $1 + 1) / ($t1 - $t0), 2)"
}
"${PSQL[@]}" -c "SELECT nvembed_passage('warm up') IS NOT NULL" >/dev/null
one=$(drain_rate 1 "$DRAIN_ROWS")
reload "ALTER SYSTEM SET nvembed.servers = 'localhost:$PA, localhost:$PB'"
"${PSQL[@]}" -c "SELECT count(*) FROM nvembed_passages(ARRAY['warm', 'up', 'both'])" >/dev/null
two=$(drain_rate $((DRAIN_ROWS + 1)) $((2 * DRAIN_ROWS)))
row "vectorizer drain, medium checkpoint, $DRAIN_ROWS rows of ~100 tokens: two servers (--threads 1 each) vs one" \
  "$two vs $one rows/s: $(calc "round($two / $one, 2)")×" "≥ 1.7×"

# 3. /v1/embeddings vs the native protocol, one server (HTTP beside its native listener).
stop_servers
PH=$(free_port)
serve "$TLS/medium" bench-medium "$PA" --threads 2 --http-listen "127.0.0.1:$PH"
reload "ALTER SYSTEM SET nvembed.servers = 'localhost:$PA'"
python3 -c "
import json
texts = ['passage %d: the keeper walked to the lighthouse at dusk and lit the lamp' % i for i in range(1000)]
json.dump({'model': 'bench-medium', 'input': texts}, open('$TLS/request.json', 'w'))
open('$TLS/texts.sql', 'w').write('SELECT count(*) FROM nvembed_passages(ARRAY(SELECT \'passage \' || g || \': the keeper walked to the lighthouse at dusk and lit the lamp\' FROM generate_series(0, 999) g))')
"
http_s() {
  curl -sS -o /dev/null -w '%{time_total}' --cacert "$TLS/ca.crt" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' --data-binary @"$TLS/request.json" "https://localhost:$PH/v1/embeddings"
}
native_s() {
  local t0 t1
  t0=$(date +%s.%N); "${PSQL[@]}" -f "$TLS/texts.sql" >/dev/null; t1=$(date +%s.%N)
  calc "$t1 - $t0"
}
http_s >/dev/null; native_s >/dev/null
best_http=999; best_native=999
for _ in 1 2 3; do
  h=$(http_s); n=$(native_s)
  best_http=$(calc "min($best_http, $h)"); best_native=$(calc "min($best_native, $n)")
done
row "bulk 1,000 texts, medium checkpoint, one server: /v1/embeddings vs nvembed_passages over the native protocol (best of 3)" \
  "$(calc "round($best_http, 2)") s vs $(calc "round($best_native, 2)") s: HTTP at $(calc "round($best_native / $best_http, 2)")× the native rate" "≥ 0.9×"
