#!/usr/bin/env bash
# Copies the fixture where the postgres OS user can read it, with the engine's own outputs for
# the texts the SQL tests embed (the SQL results must equal them).
set -euo pipefail
src=$1; dest=$2
mkdir -p "$dest"
rm -rf "$dest/nvembed-tiny-a" "$dest/broken"
cp -r "$src" "$dest/nvembed-tiny-a"
python3 - "$src/goldens.json" > "$dest/texts.jsonl" <<'PY'
import json, sys
for text in json.load(open(sys.argv[1]))["texts"].values():
    print(json.dumps(text))
PY
bin=target/release/nvembed
"$bin" embed --model "$dest/nvembed-tiny-a" --query < "$dest/texts.jsonl" > "$dest/expected_query.jsonl"
"$bin" embed --model "$dest/nvembed-tiny-a" --passage < "$dest/texts.jsonl" > "$dest/expected_passage.jsonl"
"$bin" embed --model "$dest/nvembed-tiny-a" --task "Given a claim, find documents that refute it" < "$dest/texts.jsonl" > "$dest/expected_task.jsonl"
chmod -R a+rX "$dest"; chmod a+rx "$(dirname "$dest")"
if [ "$(id -u)" = 0 ]; then chown -R postgres "$dest"; fi
