#!/usr/bin/env bash
# From a fresh clone: install what is missing, build, then train a small DeepSeek-style model
# on real text that any Debian machine can install (the `fortunes` package; the licence texts
# in /usr/share/common-licenses if it cannot be had), tokenized by dsx itself:
#   1. dsx tokenizer train   a byte-level BPE vocabulary on the corpus
#   2. dsx data prep         the corpus as HDF5 token shards
#   3. dsx train             recipes/quickstart.yaml on those shards, progress on screen
#
#   tools/quickstart.sh [--steps N]       (default 300 steps, a few minutes on 2 cores)
# Everything is written under runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) STEPS="$2"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "quickstart.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[[ -n "${DSX:-}" ]] || tools/setup.sh   # DSX=path/to/dsx skips the build
DSX=${DSX:-build/release/bin/dsx}
OUT=runs/quickstart
mkdir -p "$OUT/corpus"

if ! dpkg-query -W -f='${Status}' fortunes 2>/dev/null | grep -q "install ok installed"; then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes >/dev/null 2>&1 || true
fi
if compgen -G "/usr/share/games/fortunes/*.dat" >/dev/null; then
  # fortune files separate entries with lines holding a single %: make those blank lines so
  # every fortune becomes one document.
  for f in /usr/share/games/fortunes/*.dat; do
    src="${f%.dat}"
    sed 's/^%$//' "$src" > "$OUT/corpus/$(basename "$src").txt"
  done
  echo "quickstart: corpus = the fortunes package ($(cat "$OUT"/corpus/*.txt | wc -c) bytes)"
else
  cp /usr/share/common-licenses/* "$OUT/corpus/" 2>/dev/null || true
  for f in "$OUT"/corpus/*; do [[ "$f" == *.txt ]] || mv "$f" "$f.txt"; done
  echo "quickstart: corpus = /usr/share/common-licenses ($(cat "$OUT"/corpus/*.txt | wc -c) bytes)"
fi

if [[ ! -f "$OUT/tokenizer.json" ]]; then
  "$DSX" tokenizer train --vocab-size 1024 --output "$OUT/tokenizer.json" "$OUT"/corpus/*.txt
fi
if [[ ! -f "$OUT/data/index.json" ]]; then
  rm -rf "$OUT/data"
  "$DSX" data prep --tokenizer "$OUT/tokenizer.json" --output "$OUT/data" --split-blank-lines "$OUT"/corpus/*.txt
fi
"$DSX" data inspect "$OUT/data" --tokenizer "$OUT/tokenizer.json" | head -n 12

"$DSX" train recipes/quickstart.yaml --set "train.steps=$STEPS" --set "checkpoint.resume=never"
echo "quickstart: run directory $OUT/run (recipe.yaml, metrics.jsonl, checkpoints/)"
