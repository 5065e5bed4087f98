#!/usr/bin/env bash
# System tests of a cluster whose model servers run elsewhere (nvembed.servers): real
# nvembed-model-server processes on loopback in TLS with a token, certificates made here.
# 1. Two servers drain a vectorizer's queue, each doing at least a quarter of the rows, every
#    vector equal to the engine's own; SIGKILL of one mid-drain loses and duplicates nothing;
#    restarted, it is used again.
# 2. A wrong token, an untrusted certificate, a wrong host name, a server of another model or
#    of another checkpoint under the same name: each a clear ERROR with its SQLSTATE and the
#    server's address, and no compute spent.
# 3. A hot standby searches through the same servers.
# Run by `make test`; each check prints PASS or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
TINY=engine/tests/fixtures/nvembed-tiny-a
NAME=nvembed-tiny-a
SERVER=target/release/nvembed-model-server
fail() { echo "FAIL: $*" >&2; exit 1; }
SERVERS=()
TLS=$(mktemp -d /tmp/nvembed-remote.XXXXXX)
cleanup() {
  for pid in "${SERVERS[@]}"; do kill "$pid" 2>/dev/null || true; done
  cluster_stop
  rm -rf "$TLS"
}
trap cleanup EXIT

# Certificates: a CA, a server certificate for localhost signed by it, one for another host
# signed by it, and a self-signed one for localhost that nobody trusts.
chmod 755 "$TLS"
test_certificates "$TLS" localhost otherhost
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
  -keyout "$TLS/untrusted.key" -out "$TLS/untrusted.crt" 2>/dev/null
token=$(openssl rand -hex 24)
printf 'cluster-a %s\n' "$token" > "$TLS/tokens"
printf 'someone-else %s\n' "$(openssl rand -hex 24)" > "$TLS/other-tokens"
printf '%s\n' "$token" > "$TLS/token"
[ "$(id -u)" = 0 ] && chown postgres "$TLS/token"
chmod 600 "$TLS/token"

# start_server PORT LOG [ARGS...]: a server of the fixture on PORT (certificate for localhost,
# the cluster's token unless ARGS say otherwise), once it listens (which it does only once its
# model is loaded).
start_server() {
  local port=$1 log=$2; shift 2
  local args=(--model "$TINY" --dtype f32 --threads 1 --listen "127.0.0.1:$port" --max-request-tokens 1000000)
  local has_tls=0 has_tokens=0
  for a in "$@"; do case $a in --tls-cert) has_tls=1 ;; --tokens-file) has_tokens=1 ;; esac; done
  [ $has_tls = 1 ] || args+=(--tls-cert "$TLS/localhost.crt" --tls-key "$TLS/localhost.key")
  [ $has_tokens = 1 ] || args+=(--tokens-file "$TLS/tokens")
  [[ " $* " == *" --served-model-name "* ]] || args+=(--served-model-name "$NAME")
  "$SERVER" "${args[@]}" "$@" 2>"$log" &
  SERVERS+=($!)
  for _ in $(seq 300); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "the server on port $port did not listen: $(cat "$log")"
}

PA=$(free_port); PB=$(free_port)
start_server "$PA" "$TLS/a.log"; A=${SERVERS[-1]}
start_server "$PB" "$TLS/b.log"; B=${SERVERS[-1]}
install_nvembed
cluster_start "$NAME" "nvembed.servers = 'localhost:$PA, localhost:$PB'" "nvembed.server_token_file = '$TLS/token'" \
  "nvembed.server_ca_file = '$TLS/ca.crt'" "nvembed.dtype = 'f32'" "nvembed.vectorizer_databases = 'postgres'" \
  "nvembed.vectorizer_batch_rows = 16" "nvembed.max_request_tokens = 1000000"
# reload "ALTER SYSTEM SET nvembed.servers = '...'": waits until new sessions see the value.
reload() {
  "${PSQL[@]}" -c "$1" -c "SELECT pg_reload_conf()" >/dev/null
  local want=${1#*= }; want=${want//\'/}
  for _ in $(seq 100); do
    [ "$("${PSQL[@]}" -At -c "SHOW nvembed.servers")" = "$want" ] && { sleep 0.2; return 0; }
    sleep 0.05
  done
  fail "the reload of \"$1\" was not seen"
}
for _ in $(seq 100); do grep -q 'no local model server: calls go to nvembed.servers' "$WORK/server.log" && break; sleep 0.05; done
grep -q 'no local model server: calls go to nvembed.servers' "$WORK/server.log" || fail "the supervisor did not say it runs no local server"
pgrep -f 'nvembed-model-server --socket' >/dev/null && fail "a local model server runs although nvembed.servers is set"

# 1. Two servers drain a vectorizer.
"${PSQL[@]}" >/dev/null <<'SQL'
CREATE EXTENSION nvembed;
CREATE TABLE docs (id int PRIMARY KEY, body text, embedding real[]);
-- Every write of a vector, with the text the row had then.
CREATE TABLE docs_writes (id int, body text, embedding real[]);
CREATE FUNCTION docs_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO docs_writes VALUES (NEW.id, NEW.body, NEW.embedding); RETURN NEW; END $$;
CREATE TRIGGER docs_log AFTER UPDATE OF embedding ON docs FOR EACH ROW EXECUTE FUNCTION docs_log();
SELECT nvembed_create_vectorizer('docs', 'body', 'embedding');
SQL
status() { "${PSQL[@]}" -At -c "SELECT concat_ws(',', pending, in_progress, embedded) FROM nvembed_vectorizer_status WHERE tbl = 'docs'::regclass"; }
# drained LIMIT: waits until the queue is empty.
drained() {
  local started; started=$(date +%s)
  until [ "$(status)" = "0,0,$1" ]; do
    [ $(( $(date +%s) - started )) -lt 300 ] || fail "the queue did not drain: pending,in_progress,embedded = $(status) (want 0,0,$1)"
    sleep 0.3
  done
}
insert() { "${PSQL[@]}" -c "INSERT INTO docs SELECT g, repeat('remote text ' || g || '. ', 40) FROM generate_series($1, $2) g" >/dev/null; }
rows_of() { "${PSQL[@]}" -At -c "SELECT rows FROM nvembed_status() WHERE server = 'localhost:$1'"; }
started=$(date +%s)
insert 1 400
drained 400
seconds=$(( $(date +%s) - started ))
ra=$(rows_of "$PA"); rb=$(rows_of "$PB")
[ "$ra" -ge 100 ] && [ "$rb" -ge 100 ] || fail "rows per server: $ra and $rb of 400 (want each ≥ 100)"
# Every vector equals the engine's own for the same text.
"${PSQL[@]}" -At -c "SELECT json_agg(body ORDER BY id) FROM docs" | python3 -c "import json, sys; [print(json.dumps(t)) for t in json.load(sys.stdin)]" \
  | target/release/nvembed embed --model "$TINY" --dtype f32 --passage > "$TLS/engine.jsonl"
check_vectors() {
  "${PSQL[@]}" -At -c "SELECT json_agg(embedding ORDER BY id) FROM docs WHERE id <= $1" | python3 -c "
import json, sys
got = json.load(sys.stdin)
want = [json.loads(l) for l in open('$TLS/engine.jsonl')][:len(got)]
assert len(got) == len(want) == $1, (len(got), len(want))
worst = max(max(abs(a - b) for a, b in zip(g, w)) for g, w in zip(got, want))
assert worst <= 1e-6, worst
print(worst)"
}
worst=$(check_vectors 400) || fail "vectors differ from the engine's"
echo "PASS two TLS servers drain 400 rows in ${seconds} s: $ra and $rb rows each, every vector within $worst of the engine's"

# SIGKILL one server mid-drain; then restart it on its port and see it used again.
insert 401 800
started=$(date +%s)
until [ "$("${PSQL[@]}" -At -c "SELECT count(*) >= 440 FROM docs WHERE embedding IS NOT NULL")" = t ]; do
  [ $(( $(date +%s) - started )) -lt 120 ] || fail "the second drain did not start"
  sleep 0.1
done
kill -9 "$A"
wait "$A" 2>/dev/null || true
killed_at=$("${PSQL[@]}" -At -c "SELECT count(*) FROM docs WHERE embedding IS NOT NULL")
drained 800
result=$("${PSQL[@]}" -At -c "SELECT count(*) || ',' || count(DISTINCT id) FROM docs_writes" -c \
  "SELECT count(*) FROM docs_writes w JOIN docs d USING (id) WHERE w.embedding IS DISTINCT FROM d.embedding")
[ "$result" = "$(printf '800,800\n0')" ] || fail "writes after the kill: $result (want 800 writes of 800 rows, none stale)"
"${PSQL[@]}" -At -c "SELECT json_agg(body ORDER BY id) FROM docs" | python3 -c "import json, sys; [print(json.dumps(t)) for t in json.load(sys.stdin)]" \
  | target/release/nvembed embed --model "$TINY" --dtype f32 --passage > "$TLS/engine.jsonl"
worst=$(check_vectors 800) || fail "vectors after the kill differ from the engine's"
down=$("${PSQL[@]}" -At -c "SELECT server_running || ',' || (last_error IS NOT NULL) FROM nvembed_status() WHERE server = 'localhost:$PA'")
[ "$down" = "false,true" ] || fail "the killed server's status: running,has_error = $down"
start_server "$PA" "$TLS/a2.log"
# Its backoff ends within 30 s; then it takes work again.
started=$(date +%s)
next=801
until [ "$(rows_of "$PA")" -gt 0 ] 2>/dev/null; do
  [ $(( $(date +%s) - started )) -lt 60 ] || fail "the restarted server was not used again within 60 s"
  insert $next $((next + 49)); next=$((next + 50))
  sleep 1
done
echo "PASS SIGKILL of one server at $killed_at of 800 rows: all rows correct (within $worst), each written once; restarted, it takes work again"

# A streaming call whose server dies part-way: the texts not yet answered go to the other
# server, and the caller gets every vector once, in order.
A=${SERVERS[-1]}
"${PSQL[@]}" -c "CREATE TABLE streamed_texts AS SELECT g AS n, 'streamed text ' || g || repeat(' filler', 100) AS body FROM generate_series(1, 1500) g" >/dev/null
"${PSQL[@]}" -c "CREATE TABLE streamed AS SELECT n, e FROM nvembed_passages(ARRAY(SELECT body FROM streamed_texts ORDER BY n)) WITH ORDINALITY AS p(e, n)" \
  > "$TLS/streamed.log" 2>&1 &
call=$!
busy=""
for _ in $(seq 200); do
  busy=$("${PSQL[@]}" -At -c "SELECT server FROM nvembed_status() WHERE waiting > 0 LIMIT 1" 2>/dev/null || true)
  [ -n "$busy" ] && break
  sleep 0.05
done
[ -n "$busy" ] || fail "no server was seen working on the streaming call: $(cat "$TLS/streamed.log"; "${PSQL[@]}" -c "SELECT server, waiting, active_rows, rows, last_error FROM nvembed_status()" 2>&1)"
sleep 0.5
if [ "$busy" = "localhost:$PA" ]; then victim=$A; else victim=$B; fi
kill -9 "$victim"
wait "$victim" 2>/dev/null || true
wait "$call" || fail "the streaming call failed when its server was killed: $(cat "$TLS/streamed.log")"
"${PSQL[@]}" -At -c "SELECT json_agg(body ORDER BY n) FROM streamed_texts" | python3 -c "import json, sys; [print(json.dumps(t)) for t in json.load(sys.stdin)]" \
  | target/release/nvembed embed --model "$TINY" --dtype f32 --passage > "$TLS/streamed.jsonl"
"${PSQL[@]}" -At -c "SELECT json_agg(json_build_array(n, e) ORDER BY n) FROM streamed" | python3 -c "
import json, sys
got = json.load(sys.stdin)
want = [json.loads(l) for l in open('$TLS/streamed.jsonl')]
assert [n for n, _ in got] == list(range(1, 1501)), 'rows missing or repeated'
worst = max(max(abs(a - b) for a, b in zip(e, w)) for (_, e), w in zip(got, want))
assert worst <= 1e-6, worst" || fail "the streamed vectors after the kill are wrong"
resent=$("${PSQL[@]}" -At -c "SELECT rows FROM nvembed_status() WHERE server <> '$busy'")
echo "PASS a streaming call of 1,500 texts whose server ($busy) was SIGKILLed part-way: every vector once and in order, the rest from the other server ($resent rows there in all)"
if [ "$busy" = "localhost:$PA" ]; then start_server "$PA" "$TLS/a3.log"; A=${SERVERS[-1]}; else start_server "$PB" "$TLS/b3.log"; B=${SERVERS[-1]}; fi

# Alone in nvembed.servers, a server killed under a call: nothing is left to send the rest to,
# and the caller sees the lost connection, naming the server (08006).
reload "ALTER SYSTEM SET nvembed.servers = 'localhost:$PB'"
"${PSQL[@]}" -v VERBOSITY=verbose -c "SELECT count(*) FROM nvembed_passages(ARRAY(SELECT body FROM streamed_texts ORDER BY n))" \
  > "$TLS/alone.log" 2>&1 &
call=$!
for _ in $(seq 200); do
  [ "$("${PSQL[@]}" -At -c "SELECT waiting > 0 FROM nvembed_status()" 2>/dev/null || true)" = t ] && break
  sleep 0.05
done
kill -9 "$B"
wait "$B" 2>/dev/null || true
! wait "$call" || fail "a call whose only server was killed succeeded: $(cat "$TLS/alone.log")"
grep -q "ERROR:  08006: nvembed model server localhost:$PB connection lost" "$TLS/alone.log" \
  || fail "a call whose only server was killed: $(cat "$TLS/alone.log")"
echo "PASS a call whose only server was SIGKILLed part-way: 08006 \"nvembed model server localhost:$PB connection lost\""
start_server "$PB" "$TLS/b4.log"; B=${SERVERS[-1]}

# 2. What a cluster must refuse, each alone in nvembed.servers.
PC=$(free_port); PD=$(free_port); PE=$(free_port); PF=$(free_port); PG=$(free_port)
start_server "$PC" "$TLS/c.log" --tokens-file "$TLS/other-tokens"
start_server "$PD" "$TLS/d.log" --tls-cert "$TLS/untrusted.crt" --tls-key "$TLS/untrusted.key"
start_server "$PE" "$TLS/e.log" --tls-cert "$TLS/otherhost.crt" --tls-key "$TLS/otherhost.key"
start_server "$PF" "$TLS/f.log" --served-model-name another-model
# The same name, another checkpoint: one weight differs.
cp -r "$TINY" "$TLS/tiny-b"
python3 - "$TLS/tiny-b/model-00001-of-00002.safetensors" <<'PY'
import struct, sys
path = sys.argv[1]
data = bytearray(open(path, 'rb').read())
header = struct.unpack('<Q', data[:8])[0]
data[8 + header] ^= 1
open(path, 'wb').write(data)
PY
"$SERVER" --model "$TLS/tiny-b" --served-model-name "$NAME" --dtype f32 --threads 1 --listen "127.0.0.1:$PG" \
  --tls-cert "$TLS/localhost.crt" --tls-key "$TLS/localhost.key" --tokens-file "$TLS/tokens" 2>"$TLS/g.log" &
SERVERS+=($!)
for _ in $(seq 300); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $PG), 0.2)" 2>/dev/null && break
  sleep 0.1
done
# expect_error SERVERS SQLSTATE TEXT
expect_error() {
  reload "ALTER SYSTEM SET nvembed.servers = '$1'"
  local out; out=$("${PSQL[@]}" -v VERBOSITY=verbose -c "SELECT nvembed_query('which lighthouse?') IS NOT NULL" 2>&1 || true)
  grep -q "ERROR:  $2:" <<<"$out" || fail "servers $1: expected SQLSTATE $2: $out"
  grep -qF "$3" <<<"$out" || fail "servers $1: expected '$3' in: $out"
  grep -qF "$1" <<<"$out" || fail "servers $1: the error does not name the server: $out"
  grep -E "^(ERROR|HINT)" <<<"$out" | sed 's/^/    /'
}
expect_error "localhost:$PC" 28000 "does not accept this token"
expect_error "localhost:$PD" 08001 "failed TLS verification"
expect_error "localhost:$PE" 08001 "failed TLS verification"
expect_error "localhost:$PF" 08004 "it serves model \"another-model\""
# The cluster's servers so far serve tiny-a's revision: tiny-b's is refused.
reload "ALTER SYSTEM SET nvembed.servers = 'localhost:$PA'"
"${PSQL[@]}" -c "SELECT nvembed_query('pin') IS NOT NULL" >/dev/null
expect_error "localhost:$PG" 08004 "but this cluster's servers serve model \"$NAME\""
for p in "$PC" "$PD" "$PE" "$PF" "$PG"; do
  reload "ALTER SYSTEM SET nvembed.servers = 'localhost:$p'"
  r=$("${PSQL[@]}" -At -c "SELECT coalesce(rows::text, 'none') FROM nvembed_status()")
  case $p in "$PF" | "$PG") [ "$r" = 0 ] || fail "a refused server embedded $r rows" ;; esac
done
! grep -q "$token" "$TLS"/*.log || fail "a token appears in a server's log"
echo "PASS refused: wrong token 28000, untrusted certificate and wrong host name 08001, another model and another checkpoint of the same name 08004, each naming its server; the refused servers embedded nothing"

# 3. A hot standby searches through the same servers.
reload "ALTER SYSTEM SET nvembed.servers = 'localhost:$PA, localhost:$PB'"
standby_start
search="SELECT string_agg(id::text, ',' ORDER BY score DESC, id) FROM (
  SELECT id, (SELECT sum(a * b) FROM unnest(embedding, nvembed_query('remote text 77')) u(a, b)) AS score
  FROM docs WHERE embedding IS NOT NULL ORDER BY 2 DESC, id LIMIT 5) s"
primary=$("${PSQL[@]}" -At -c "$search")
standby=$("${SPSQL[@]}" -c "SELECT pg_is_in_recovery()" -c "$search" | tr '\n' ' ')
[ "$standby" = "t $primary " ] || fail "the standby's search ($standby) differs from the primary's ($primary)"
pgrep -f 'nvembed-model-server --socket' >/dev/null && fail "the standby started a local model server"
echo "PASS a hot standby searches through the remote servers: top 5 $primary, as on the primary"
