#!/usr/bin/env bash
# tools/gpu/gpu_tests.py: the gpu-labelled ctest tests of this build, recorded as pack.sh does
# (commands relocated, their files copied into a package folder), then run from that folder
# as run_all.sh does on a GPU machine. Every test must come out as ctest has it here (passed,
# or skipped without a GPU); a relocation mistake shows as "failed" (file not found, ...).
#   gpu_tests_relocated.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build="$(cd "$1" && pwd)"
src="$(cd "$2" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/dsx-gpu-tests-test.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/pkg" "$work/run"
python3 "$src/tools/gpu/gpu_tests.py" manifest "$build" "$src" "$work/pkg/gpu-tests.json" >"$work/files.txt"
while read -r rel; do
  mkdir -p "$work/pkg/$(dirname "$rel")"
  cp "$build/$rel" "$work/pkg/$rel"
done <"$work/files.txt"
n=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["tests"]))' "$work/pkg/gpu-tests.json")
echo "manifest: $n gpu tests, files: $(tr '\n' ' ' <"$work/files.txt")"
grep -q "$build" "$work/pkg/gpu-tests.json" && { echo "FAIL: the manifest still names $build"; exit 1; }
out="$(python3 "$src/tools/gpu/gpu_tests.py" run "$work/pkg/gpu-tests.json" "$work/pkg" "$src" "$work/run" \
  --budget-s 900 --log "$work/log.txt")" || { echo "$out"; cat "$work/log.txt"; echo "FAIL: a relocated test failed"; exit 1; }
echo "$out"
grep -qE "^gpu tests: [0-9]+ passed, 0 failed, [0-9]+ skipped" <<<"$out" || { echo "FAIL: no summary line"; exit 1; }
