#!/bin/sh
# `dsx tokenizer` from the command line: help texts, train -> encode -> decode round trip, and
# exit code 2 with a message naming the file or key for each kind of bad input.
#   tokenizer_cli.sh DSX WORKDIR
set -u
DSX=$1
WORK=$2
rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
failures=0

fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# expect_error "what" "text the message must contain" command...
expect_error() {
  what=$1
  needle=$2
  shift 2
  "$@" >"$WORK/out" 2>"$WORK/err"
  rc=$?
  if [ $rc -ne 2 ]; then
    fail "$what: exit code $rc, expected 2 ($(cat "$WORK/err"))"
  elif ! grep -qF -- "$needle" "$WORK/err"; then
    fail "$what: message does not name '$needle': $(cat "$WORK/err")"
  else
    echo "ok: $what -> $(cat "$WORK/err")"
  fi
}

for sub in "" train encode decode info; do
  if ! "$DSX" tokenizer $sub --help >"$WORK/help" 2>&1 || ! grep -q "Usage" "$WORK/help"; then
    fail "dsx tokenizer $sub --help"
  fi
done

# A small corpus: English, German, Chinese, code, digits, blank-line runs.
i=0
: >"$WORK/corpus.txt"
while [ $i -lt 200 ]; do
  printf 'The tokenizer learns merges from text number %d.\nGrüße aus München, %d Äpfel.\n中文分词测试第%d行。\n    if (x == %d) { return y; }\n\n' \
    $i $((i * 7)) $i $((i * 13)) >>"$WORK/corpus.txt"
  i=$((i + 1))
done

if ! "$DSX" tokenizer train --quiet --vocab-size 400 -o "$WORK/tok.json" "$WORK/corpus.txt"; then
  fail "tokenizer train on a valid corpus"
fi
text="Grüße <think>aus</think> München 12345 中文"
ids=$("$DSX" tokenizer encode -t "$WORK/tok.json" "$text") || fail "tokenizer encode"
back=$("$DSX" tokenizer decode -t "$WORK/tok.json" $ids) || fail "tokenizer decode"
[ "$back" = "$text" ] || fail "decode(encode(text)) gave '$back'"
"$DSX" tokenizer info -t "$WORK/tok.json" | grep -q "vocab size  400" || fail "tokenizer info shows the vocab size"

expect_error "train: missing corpus file" "$WORK/nope.txt" \
  "$DSX" tokenizer train --quiet --vocab-size 400 -o "$WORK/x.json" "$WORK/nope.txt"
expect_error "train: vocab size too small" "too small" \
  "$DSX" tokenizer train --quiet --vocab-size 100 -o "$WORK/x.json" "$WORK/corpus.txt"
expect_error "train: unknown pre-tokenizer" "pre-tokenizer" \
  "$DSX" tokenizer train --quiet --vocab-size 400 --pre-tokenizer bert -o "$WORK/x.json" "$WORK/corpus.txt"
[ -e "$WORK/x.json" ] && fail "a failed training left $WORK/x.json behind"

expect_error "encode: missing tokenizer file" "$WORK/missing.json" \
  "$DSX" tokenizer encode -t "$WORK/missing.json" hello
printf '{"model": {"type": "BPE", "vocab": {' >"$WORK/truncated.json"
expect_error "encode: unreadable JSON" "$WORK/truncated.json" "$DSX" tokenizer encode -t "$WORK/truncated.json" hello
sed 's/"merges"/"merges_renamed"/' "$WORK/tok.json" >"$WORK/no-merges.json"
expect_error "encode: no merges" "model.merges" "$DSX" tokenizer encode -t "$WORK/no-merges.json" hello
sed 's/"vocab"/"vocab_renamed"/' "$WORK/tok.json" >"$WORK/no-vocab.json"
expect_error "encode: no vocab" "model.vocab" "$DSX" tokenizer encode -t "$WORK/no-vocab.json" hello
expect_error "decode: id out of range" "999999" "$DSX" tokenizer decode -t "$WORK/tok.json" 999999

if [ $failures -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "OK: all tokenizer CLI checks passed"
