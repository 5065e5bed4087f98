#!/usr/bin/env bash
# End-to-end demo: a throwaway PostgreSQL 15 cluster with nvembed and pgvector, a table with the
# embedding trigger, the model card's passages and queries, scores and nvembed_status().
# NVEMBED_MODEL: a hub id (default nvidia/NV-Embed-v2) or a local checkpoint directory.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
trap cluster_stop EXIT
OFFLINE_MODEL=engine/tests/fixtures/nvembed-tiny-a
model=${NVEMBED_MODEL:-nvidia/NV-Embed-v2}
install_nvembed
cluster_start "$model"

status=0
"${PSQL[@]}" -e 2>"$WORK/psql.err" <<'SQL' || status=$?
CREATE EXTENSION vector;
CREATE EXTENSION nvembed;
SELECT server_running, loaded FROM nvembed_status();  -- the model loads on the first call, not before
CREATE TABLE docs (id serial PRIMARY KEY, body text NOT NULL, embedding real[]);
CREATE TRIGGER docs_embed BEFORE INSERT OR UPDATE ON docs
  FOR EACH ROW EXECUTE FUNCTION nvembed_embed_trigger('body', 'embedding');
INSERT INTO docs (body) VALUES
 ('Since you''re reading this, you are probably someone from a judo background or someone who is just wondering how judo techniques can be applied under wrestling rules. So without further ado, let''s get to the question. Are Judo throws allowed in wrestling? Yes, judo throws are allowed in freestyle and folkstyle wrestling. You only need to be careful to follow the slam rules when executing judo throws. In wrestling, a slam is lifting and returning an opponent to the mat with unnecessary force.'),
 ('Below are the basic steps to becoming a radiologic technologist in Michigan:Earn a high school diploma. As with most careers in health care, a high school education is the first step to finding entry-level employment. Taking classes in math and science, such as anatomy, biology, chemistry, physiology, and physics, can help prepare students for their college studies and future careers.Earn an associate degree. Entry-level radiologic positions typically require at least an Associate of Applied Science. Before enrolling in one of these degree programs, students should make sure it has been properly accredited by the Joint Review Committee on Education in Radiologic Technology (JRCERT).Get licensed or certified in the state of Michigan.');
WITH q(query) AS (VALUES ('are judo throws allowed in wrestling?'),
                         ('how to become a radiology technician in michigan?'))
SELECT q.query, d.id, round((100 * -(d.embedding::vector <#> nvembed_query(q.query)::vector))::numeric, 2) AS score
FROM q CROSS JOIN docs d ORDER BY q.query, score DESC;
SELECT * FROM nvembed_status();
SQL
cat "$WORK/psql.err" >&2
# A hub model that cannot be fetched (no network, no cache) fails at the first embedding: the
# last line says how to see the demo without the hub.
if [ "$status" != 0 ] && [ ! -d "$model" ] && grep -q 'could not load model' "$WORK/psql.err"; then
  echo "nvembed demo: the hub model $model could not be fetched; for the offline demo run: NVEMBED_MODEL=$OFFLINE_MODEL make demo" >&2
fi
exit "$status"
