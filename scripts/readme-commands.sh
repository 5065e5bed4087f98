#!/usr/bin/env bash
# Runs the README's `cargo run --example nvembed_v2 ...` lines exactly as written, from the
# repository root: those with local files must print the model card's scores, those
# that need the hub must — with no hub reachable — fail with one line naming the local options.
set -euo pipefail
cd "$(dirname "$0")/.."
hf_home=$(mktemp -d); trap 'rm -rf "$hf_home"' EXIT
mapfile -t commands < <(grep -E '^cargo run --example nvembed_v2' README.md | sed 's/ *#.*$//')
[ "${#commands[@]}" -ge 4 ] || { echo "README lists ${#commands[@]} example commands, expected at least 4" >&2; exit 1; }
failed=0
for command in "${commands[@]}"; do
  set +e
  out=$(HF_HOME="$hf_home" HF_HUB_OFFLINE=1 bash -c "$command" 2>"$hf_home/stderr")
  status=$?
  set -e
  # cargo's own progress lines are not the example's output.
  err=$(grep -vE '^ *(Compiling|Finished|Running|Blocking|Fresh) ' "$hf_home/stderr" || true)
  if [[ "$command" == *--model-dir* || "$command" == *--model-files* ]]; then
    if [ "$status" = 0 ] && grep -q '^scores: ' <<<"$out"; then ok=1; else ok=0; fi
  else
    if [ "$status" != 0 ] && [ "$(wc -l <<<"$err")" = 1 ] && grep -q -- '--model-dir' <<<"$err"; then ok=1; else ok=0; fi
  fi
  if [ "$ok" = 1 ]; then
    echo "ok: $command"
  else
    echo "FAILED (exit $status): $command"; echo "$out" | head -5; echo "$err" | head -5
    failed=1
  fi
done
exit "$failed"
