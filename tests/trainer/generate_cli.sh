#!/usr/bin/env bash
# `dsx generate` end to end: a tokenizer and a token dataset made from a small corpus, the tiny
# recipe trained on them for a few steps, then sampling from the checkpoint: output, seed
# determinism, the recipe's tokenizer as default, and exit code 2 with a clear message for
# each kind of bad input.
#   generate_cli.sh DSX REPO WORKDIR
set -euo pipefail
dsx=$1
repo=$2
work=$3
expect=(bash "$repo/tests/trainer/expect_exit.sh")
rm -rf "$work"
mkdir -p "$work"
cd "$work"

for i in $(seq 1 200); do printf 'note %d: the quick brown fox jumps over the lazy dog\n\n' "$i"; done >corpus.txt
"$dsx" tokenizer train --quiet --vocab-size 300 --output tok.json corpus.txt
"$dsx" data prep --quiet --tokenizer tok.json --output data --split-blank-lines corpus.txt >/dev/null
"$dsx" train "$repo/recipes/tiny.yaml" --set data.kind=datasets --set 'data.sources=[{path: data}]' \
  --set data.tokenizer=tok.json --set model.vocab_size=300 --set train.steps=3 --set optim.schedule.warmup=1 --set train.seq_len=32 \
  --set train.global_batch=8 --set train.micro_batch=8 --set logging.run_dir=run --set checkpoint.interval=3 \
  >train.log

status=0
check() { "${expect[@]}" "$@" || status=1; }

# The checkpoint root (newest checkpoint) and the recipe's data.tokenizer by default.
gen=("$dsx" generate --checkpoint run/checkpoints --prompt "the quick" --prompt "note 7:" --num-samples 2
  --max-new-tokens 12 --seed 5 --top-k 40 --top-p 0.95 --stop "never in the output")
check 0 "(step 3)" "prompt 1/2, sample 1/2" "prompt 2/2, sample 2/2" "the quick" "note 7:" "tokens/s" -- "${gen[@]}"
# The same seed gives the same completions (everything but the timing line).
"${gen[@]}" | grep -av "tokens/s" >first.txt
"${gen[@]}" | grep -av "tokens/s" >second.txt
if ! cmp -s first.txt second.txt; then
  echo "two runs with --seed 5 differ:"
  diff first.txt second.txt || true
  status=1
fi
check 0 "stopped by" -- "$dsx" generate --checkpoint run/checkpoints/step-000003 --tokenizer tok.json \
  --prompt "the" --temperature 0 --max-new-tokens 4

# Bad input: exit code 2 and a message naming what is wrong.
check 2 "--checkpoint \`no-such-dir\`: no such directory" -- "$dsx" generate --checkpoint no-such-dir --prompt x
mkdir -p empty-root
check 2 "--checkpoint \`empty-root\` is not a checkpoint and holds no complete one" -- \
  "$dsx" generate --checkpoint empty-root --prompt x
check 2 "tokenizer \`no-such.json\`: no such file" -- \
  "$dsx" generate --checkpoint run/checkpoints --tokenizer no-such.json --prompt x
"$dsx" tokenizer train --quiet --vocab-size 400 --output big.json corpus.txt
check 2 "more than the model's vocabulary (300)" -- \
  "$dsx" generate --checkpoint run/checkpoints --tokenizer big.json --prompt x
# A synthetic-data run names no tokenizer.
"$dsx" train "$repo/recipes/tiny.yaml" --set train.steps=1 --set optim.schedule.warmup=0 --set train.seq_len=16 --set train.global_batch=8 \
  --set train.micro_batch=8 --set logging.run_dir=synthetic --set checkpoint.interval=1 >synthetic.log
check 2 "no tokenizer: pass --tokenizer" -- "$dsx" generate --checkpoint synthetic/checkpoints --prompt x
check 2 "top_p must be in (0, 1]" -- "$dsx" generate --checkpoint run/checkpoints --prompt x --top-p 0
check 2 "--num-samples must be >= 1" -- "$dsx" generate --checkpoint run/checkpoints --prompt x --num-samples 0
check 0 "--checkpoint" "--prompt" "--temperature" "--top-k" "--top-p" "--max-new-tokens" "--seed" "--stop" \
  "--num-samples" "--tokenizer" -- "$dsx" generate --help
exit $status
