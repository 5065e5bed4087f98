#!/usr/bin/env bash
# System tests of an installation's life: nvembed 0.1.0, created from the SQL it shipped with and
# used through its trigger, updated in place with ALTER EXTENSION UPDATE; pg_dump / pg_restore of a
# database with vectors, triggers and vectorizers, without re-embedding; a streaming hot standby
# that answers searches with its own model server. Run by `make test` on PG_CONFIG's major; each
# check prints PASS or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
TINY=engine/tests/fixtures/nvembed-tiny-a
OLD_VERSION=0.1.0
OLD_SQL=extension/sql/nvembed--$OLD_VERSION.sql
VERSION=$(awk -F'"' '$1 ~ /^version/ { print $2; exit }' extension/Cargo.toml)
EXTDIR="$("$PG_CONFIG" --sharedir)/extension"
fail() { echo "FAIL: $*" >&2; exit 1; }
cleanup() {
  cluster_stop
  $SUDO rm -f "$EXTDIR/nvembed--$OLD_VERSION.sql"
}
trap cleanup EXIT
# sql DB [psql arguments]: unaligned, tuples only.
sql() { local db=$1; shift; "${PSQL[@]}" -d "$db" -At "$@"; }
# wait_embedded DB TABLE: until the vectorizer of TABLE has nothing pending or in progress.
wait_embedded() {
  for _ in $(seq 600); do
    [ "$(sql "$1" -c "SELECT sum(pending + in_progress) FROM nvembed_vectorizer_status WHERE tbl = '$2'::regclass")" = 0 ] && return 0
    sleep 0.1
  done
  fail "the vectorizer of $2 in $1 did not drain in 60 s: $(sql "$1" -c "SELECT * FROM nvembed_vectorizer_status")"
}
# The extension's objects with their definitions, privileges and policies: equal after an update
# and after a fresh install.
describe_extension() {
  sql "$1" <<'SQL'
SELECT pg_describe_object(d.classid, d.objid, 0) || ': ' || CASE d.classid
    WHEN 'pg_proc'::regclass THEN pg_get_functiondef(d.objid) || ' acl=' || coalesce(p.proacl::text, '')
    WHEN 'pg_class'::regclass THEN
      coalesce(CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(d.objid) END, '')
      || ' columns=' || coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                                                    || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '') || coalesce(' identity ' || nullif(a.attidentity::text, ''), ''), ', ' ORDER BY a.attnum)
                                  FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                                  WHERE a.attrelid = d.objid AND a.attnum > 0 AND NOT a.attisdropped), '')
      || ' acl=' || coalesce(c.relacl::text, '') || ' rls=' || c.relrowsecurity
      || ' indexes=' || coalesce((SELECT string_agg(pg_get_indexdef(i.indexrelid), '; ' ORDER BY 1) FROM pg_index i WHERE i.indrelid = d.objid), '')
      || ' constraints=' || coalesce((SELECT string_agg(pg_get_constraintdef(k.oid), '; ' ORDER BY 1) FROM pg_constraint k WHERE k.conrelid = d.objid), '')
      || ' policies=' || coalesce((SELECT string_agg(pol.polname || ' ' || pol.polcmd::text || ' ' || coalesce(pg_get_expr(pol.polqual, pol.polrelid), '')
                                                     || ' ' || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), ''), '; ' ORDER BY pol.polname)
                                   FROM pg_policy pol WHERE pol.polrelid = d.objid), '')
    WHEN 'pg_event_trigger'::regclass THEN (SELECT e.evtevent || ' ' || e.evtfoid::regproc || ' ' || coalesce(e.evttags::text, '') FROM pg_event_trigger e WHERE e.oid = d.objid)
    ELSE '' END
FROM pg_depend d
LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'nvembed')
UNION ALL
SELECT 'configuration tables: ' || (SELECT string_agg(t::regclass::text, ', ' ORDER BY t::regclass::text) FROM pg_extension, unnest(extconfig) t WHERE extname = 'nvembed')
ORDER BY 1;
SQL
}

install_nvembed
# 0.1.0's install script is not shipped any more (an installed 0.1.0 only needs the update
# script); the test puts the one 0.1.0 shipped where CREATE EXTENSION ... VERSION finds it.
$SUDO install -m 644 "$OLD_SQL" "$EXTDIR/nvembed--$OLD_VERSION.sql"
cluster_start "$TINY" "nvembed.vectorizer_databases = 'postgres, dumped, restored'" "wal_level = replica" "max_wal_senders = 4"

# 1. 0.1.0 -> current, in place.
sql postgres >/dev/null <<SQL
CREATE EXTENSION vector;
CREATE EXTENSION nvembed VERSION '$OLD_VERSION';
CREATE TABLE docs (id int PRIMARY KEY, body text, embedding real[]);
CREATE TRIGGER docs_embed BEFORE INSERT OR UPDATE ON docs
  FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'embedding');
INSERT INTO docs (id, body) VALUES (1, 'The harbour at dawn, boats leaving one by one.'),
  (2, 'A recipe for rye bread with a sourdough starter.'), (3, NULL);
-- Users' objects that depend on the extension's functions must survive the update.
CREATE VIEW docs_search AS
  SELECT id, embedding::vector <#> nvembed_query('how do I bake bread?')::vector AS distance FROM docs;
CREATE TABLE docs_before AS SELECT * FROM docs;
SQL
[ "$(sql postgres -c "SELECT extversion FROM pg_extension WHERE extname = 'nvembed'")" = "$OLD_VERSION" ] || fail "could not create version $OLD_VERSION"
# Until the update, this build serves 0.1.0's SQL: its nvembed_status() columns must read right.
status_before=$(sql postgres -c "SELECT restarts || ',' || pid FROM nvembed_status()")
sql postgres -c "ALTER EXTENSION nvembed UPDATE" >/dev/null
status_after=$(sql postgres -c "SELECT restarts || ',' || pid FROM nvembed_status()")
[ "$status_before" = "$status_after" ] && [ "${status_after#*,}" -gt 0 ] ||
  fail "nvembed_status() restarts,pid at $OLD_VERSION = $status_before, after the update = $status_after"
[ "$(sql postgres -c "SELECT extversion FROM pg_extension WHERE extname = 'nvembed'")" = "$VERSION" ] || fail "ALTER EXTENSION UPDATE did not reach $VERSION"
result=$(sql postgres <<'SQL'
-- The rows embedded by 0.1.0 are untouched.
SELECT count(*) FROM docs d JOIN docs_before b USING (id) WHERE d.embedding IS NOT DISTINCT FROM b.embedding AND d.body IS NOT DISTINCT FROM b.body;
-- The old trigger embeds inserts and changed texts.
WITH inserted AS (INSERT INTO docs (id, body) VALUES (4, 'Written after the update.') RETURNING 1) SELECT count(*) FROM inserted;
UPDATE docs SET body = 'Bread, baked again after the update.' WHERE id = 2;
SELECT count(*) FROM docs WHERE body IS NOT NULL
  AND (SELECT max(abs(p - q)) FROM unnest(embedding, nvembed_passage(body)) u(p, q)) <= 1e-6;
SELECT count(distance) FROM docs_search;
-- Every function of the current version, on the updated installation.
SELECT cardinality(nvembed_query('bread')) = nvembed_model_dimension()
   AND cardinality(nvembed_query('bread', 'Given a question, retrieve passages that answer it')) = nvembed_model_dimension()
   AND nvembed_task_instruction('Given a question, retrieve passages that answer it') LIKE 'Instruct: %'
   AND (SELECT count(*) FROM nvembed_passages(ARRAY['a', 'b'])) = 2
   AND (SELECT count(*) FROM nvembed_queries(ARRAY['a', 'b'])) = 2
   AND (SELECT count(*) FROM nvembed_queries(ARRAY['a'], 'Given a question, retrieve passages that answer it')) = 1
   AND (SELECT loaded AND active_rows = 0 FROM nvembed_status());
SQL
)
[ "$result" = $'3\n1\n3\n3\nt' ] || fail "after the update: unchanged rows, inserted, correct vectors, rows the view ranks, functions = $(tr '\n' ' ' <<<"$result") (want 3 1 3 3 t)"
sql postgres >/dev/null <<'SQL'
CREATE TABLE notes (id int PRIMARY KEY, body text, embedding real[]);
INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 5) g;
CALL nvembed_backfill('notes', 'body', 'embedding');
UPDATE notes SET embedding = NULL;
SELECT nvembed_create_vectorizer('notes', 'body', 'embedding');
SQL
wait_embedded postgres notes
result=$(sql postgres -c "SELECT count(*) FROM notes WHERE (SELECT max(abs(p - q)) FROM unnest(embedding, nvembed_passage(body)) u(p, q)) <= 1e-6")
[ "$result" = 5 ] || fail "backfill and vectorizer after the update: $result of 5 rows correct"
sql postgres -c "SELECT nvembed_drop_vectorizer('notes', 'embedding')" >/dev/null
sql postgres -c "CREATE DATABASE fresh" >/dev/null
sql fresh -c "CREATE EXTENSION nvembed" >/dev/null
describe_extension postgres > "$WORK/updated.txt"
describe_extension fresh > "$WORK/fresh.txt"
diff -u "$WORK/fresh.txt" "$WORK/updated.txt" >&2 || fail "the updated extension differs from a fresh install of $VERSION (diff above)"
objects=$(sql fresh -c "SELECT count(*) FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e' AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'nvembed')")
echo "PASS $OLD_VERSION -> $VERSION in place: rows, trigger, a dependent view and every function work; the catalog equals a fresh install's ($objects objects)"

# 2. pg_dump / pg_restore of a database using nvembed.
sql postgres -c "CREATE DATABASE dumped" >/dev/null
sql dumped >/dev/null <<'SQL'
CREATE EXTENSION vector;
CREATE EXTENSION nvembed;
CREATE TABLE docs (id int PRIMARY KEY, body text, embedding real[]);
CREATE TRIGGER docs_embed BEFORE INSERT OR UPDATE ON docs
  FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'embedding');
INSERT INTO docs SELECT g, 'document ' || g FROM generate_series(1, 20) g;
SELECT format('CREATE TABLE notes (id int PRIMARY KEY, body text, embedding vector(%s))', nvembed_model_dimension()) \gexec
CREATE TABLE events (id int, at date, body text, embedding real[], PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
SELECT nvembed_create_vectorizer('notes', 'body', 'embedding');
SELECT nvembed_create_vectorizer('events', 'body', 'embedding');
SELECT nvembed_create_chunk_vectorizer('events', 'body', 'event_chunks', 32, 4);
INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 30) g;
INSERT INTO events SELECT g, '2026-06-01'::date + g, 'event ' || g || '. ' || repeat('A sentence of event ' || g || '. ', 12)
FROM generate_series(1, 10) g;
SQL
wait_embedded dumped notes
wait_embedded dumped events
sql dumped -c "SELECT nvembed_create_search_index('notes', centred => true)" >/dev/null
# The search of notes through its index (centred: its centre function is ordinary DDL, dumped
# before the index, and nothing else is needed): the ids found, and whether the index was scanned.
indexed_search="BEGIN; SET LOCAL enable_seqscan = off;
  SELECT string_agg((h.item).id::text, ',') FROM nvembed_search(NULL::notes, 'note 7', 5, candidates => 30) h;
  SELECT pg_stat_get_xact_numscans(i.indexrelid) FROM pg_index i WHERE i.indrelid = 'notes'::regclass AND NOT i.indisprimary;
  COMMIT;"
"${AS_PG[@]}" "$PG_BINDIR/pg_dump" -h "$WORK" -p "$PORT" -U postgres -Fc -d dumped -f "$WORK/dumped.dump"
counters() { sql postgres -c "SELECT requests || ',' || tokens FROM nvembed_status()"; }
before=$(counters)
sql postgres -c "CREATE DATABASE restored" >/dev/null
"${AS_PG[@]}" "$PG_BINDIR/pg_restore" -h "$WORK" -p "$PORT" -U postgres -d restored --exit-on-error "$WORK/dumped.dump" \
  || fail "pg_restore failed"
sleep 2 # the restored database's vectorizer worker has had time to find work, if there were any
after=$(counters)
[ "$before" = "$after" ] || fail "restoring re-embedded: model requests,tokens went from $before to $after"
fingerprint="SELECT (SELECT md5(string_agg(id || body || embedding::text, ',' ORDER BY id)) FROM docs)
  || (SELECT md5(string_agg(id || body || embedding::text, ',' ORDER BY id)) FROM notes)
  || (SELECT md5(string_agg(id || body || embedding::text, ',' ORDER BY id)) FROM events)
  || (SELECT md5(string_agg(concat_ws('|', id, at, chunk_seq, chunk, embedding), ',' ORDER BY id, chunk_seq)) FROM event_chunks)
  || (SELECT string_agg(tbl || ':' || coalesce(chunk_table::text, '') || ':' || embedded || ':' || pending || ':' || failed, ',' ORDER BY id)
      FROM nvembed_vectorizer_status)"
[ "$(sql dumped -c "$fingerprint")" = "$(sql restored -c "$fingerprint")" ] || fail "restored rows or vectorizers differ from the dumped ones"
dumped_search=$(sql dumped <<<"$indexed_search" | tr '\n' ' ')
restored_search=$(sql restored <<<"$indexed_search" | tr '\n' ' ')
[ "$restored_search" = "$dumped_search" ] && [ "${dumped_search#* }" = "1 " ] \
  || fail "nvembed_search through the restored index found $restored_search (ids, index scans), the dumped database $dumped_search"
sql restored >/dev/null <<'SQL'
INSERT INTO docs VALUES (21, 'document 21');
INSERT INTO notes VALUES (31, 'note 31');
INSERT INTO events VALUES (11, '2026-07-01', 'event 11');
UPDATE notes SET body = 'note one, changed' WHERE id = 1;
CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
INSERT INTO events VALUES (12, '2027-07-01', 'event 12');
UPDATE events SET body = 'event two, changed' WHERE id = 2;
DELETE FROM events WHERE id = 3;
CREATE TABLE later (id int PRIMARY KEY, body text, embedding real[]);
INSERT INTO later VALUES (1, 'added after the restore');
SELECT nvembed_create_vectorizer('later', 'body', 'embedding');
SQL
for t in notes events later; do wait_embedded restored "$t"; done
result=$(sql restored <<'SQL'
SELECT (SELECT count(*) FROM docs WHERE (SELECT max(abs(p - q)) FROM unnest(embedding, nvembed_passage(body)) u(p, q)) <= 1e-6)
    || ',' || (SELECT count(*) FROM notes WHERE (SELECT max(abs(p - q)) FROM unnest(embedding::real[], nvembed_passage(body)) u(p, q)) <= 1e-6)
    || ',' || (SELECT count(*) FROM events WHERE (SELECT max(abs(p - q)) FROM unnest(embedding, nvembed_passage(body)) u(p, q)) <= 1e-6)
    || ',' || (SELECT count(*) FROM later WHERE embedding IS NOT NULL)
    || ',' || (SELECT count(DISTINCT id) FROM nvembed_vectorizer_status)
    || ',' || (SELECT count(*) FROM events e
               WHERE (SELECT array_agg(c.chunk_seq || ':' || c.chunk ORDER BY c.chunk_seq) FROM event_chunks c WHERE (c.id, c.at) = (e.id, e.at))
                     = (SELECT array_agg(x.chunk_seq || ':' || x.chunk ORDER BY x.chunk_seq) FROM nvembed_chunks(e.body, 32, 4) x))
    || ',' || ((SELECT count(*) FROM event_chunks c WHERE (SELECT max(abs(p - q)) FROM unnest(c.embedding::real[], nvembed_passage(c.chunk)) u(p, q)) <= 1e-6)
               = (SELECT count(*) FROM event_chunks))
SQL
)
[ "$result" = "21,31,11,1,4,11,true" ] || fail "after the restore: correct docs,notes,events,later rows, vectorizers, events with their text's chunks, chunk embeddings right = $result (want 21,31,11,1,4,11,true)"
echo "PASS pg_dump/pg_restore: vectors, triggers, 2 vectorizers (one partitioned), a chunk vectorizer (partitioned, date key) and a search index restored as they were (nvembed_search finds the same rows through the restored index), no model call; new rows, a new partition, changed and deleted rows and a new vectorizer are kept in step"

# 3. A streaming hot standby answers nvembed_query with its own model server.
# (pg_basebackup warns that it skips the model server's socket.)
standby_start
sql dumped -c "INSERT INTO docs VALUES (22, 'sent to the standby by streaming')" >/dev/null
lsn=$(sql postgres -c "SELECT pg_current_wal_lsn()")
for _ in $(seq 300); do
  [ "$("${SPSQL[@]}" -d dumped -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && break
  sleep 0.1
done
search="SELECT string_agg(id::text, ',' ORDER BY embedding::vector <#> nvembed_query('document 7')::vector, id) FROM (SELECT * FROM docs) d"
primary=$(sql dumped -c "$search")
standby=$("${SPSQL[@]}" -d dumped -c "SELECT pg_is_in_recovery()" -c "$search" | tr '\n' ' ')
[ "$standby" = "t $primary " ] || fail "the standby's search ($standby) differs from the primary's ($primary)"
search="SELECT string_agg((h.item).id::text, ',') FROM nvembed_search(NULL::notes, 'note 7', 5) h"
primary=$(sql dumped -c "$search")
standby=$("${SPSQL[@]}" -d dumped -c "$search")
[ -n "$primary" ] && [ "$standby" = "$primary" ] || fail "the standby's nvembed_search ($standby) differs from the primary's ($primary)"
pids=$(sql postgres -c "SELECT pid FROM nvembed_status()"),$("${SPSQL[@]}" -d postgres -c "SELECT pid FROM nvembed_status()")
[ "${pids%,*}" != "${pids#*,}" ] || fail "the standby did not start its own model server (pids $pids)"
if grep -E 'ERROR|FATAL|PANIC' "$WORK/standby.log" | grep -v 'the database system is starting up' >&2; then
  fail "the standby logged errors (above)"
fi
rows=$("${SPSQL[@]}" -d dumped -c "SELECT count(*) FROM docs")
echo "PASS hot standby: $rows rows searched with its own model server (pids primary,standby = $pids), same order as the primary, nvembed_search too, no errors in its log"

# 4. `make demo` where the hub cannot be reached: after the load error, one line names the offline
# demo, and that command works.
cleanup
out=$(HF_HUB_OFFLINE=1 HF_HOME="$(mktemp -d)" make -s demo 2>&1) && fail "make demo without the hub succeeded"
hint="nvembed demo: the hub model nvidia/NV-Embed-v2 could not be fetched; for the offline demo run: NVEMBED_MODEL=$TINY make demo"
grep -n -e 'could not load model' -e "^$hint\$" <<<"$out" | cut -d: -f1 | tr '\n' ' ' | grep -qE '^[0-9]+ [0-9]+ $' \
  || { echo "$out" | tail -n 5 >&2; fail "make demo without the hub: want the load error, then the hint line"; }
out=$(NVEMBED_MODEL=$TINY make -s demo 2>&1) || { echo "$out" | tail -n 5 >&2; fail "the offline demo failed"; }
[ "$(grep -cE '^ (are judo|how to become).*\| +[0-9]+ \| +-?[0-9.]+$' <<<"$out")" = 4 ] \
  || { echo "$out" | tail -n 20 >&2; fail "the offline demo printed no scores"; }
echo "PASS make demo: without the hub, the load error and then the offline command; that command prints the 4 scores"
