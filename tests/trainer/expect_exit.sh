#!/usr/bin/env bash
# Runs a command and checks its exit code and that its output (stdout and stderr together)
# contains each given fragment, literally.
#   expect_exit.sh CODE [FRAGMENT...] -- COMMAND [ARG...]
set -u
expected_code=$1
shift
fragments=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  fragments+=("$1")
  shift
done
if [ $# -eq 0 ]; then
  echo "expect_exit.sh: missing -- COMMAND" >&2
  exit 1
fi
shift
output=$("$@" 2>&1)
code=$?
status=0
if [ "$code" -ne "$expected_code" ]; then
  echo "exit code $code, expected $expected_code"
  status=1
fi
for fragment in "${fragments[@]}"; do
  if ! grep -qF -- "$fragment" <<<"$output"; then
    echo "output lacks: $fragment"
    status=1
  fi
done
if [ $status -ne 0 ]; then
  echo "--- output of: $*"
  echo "$output"
fi
exit $status
