#!/bin/sh
# Reward program that never answers. It records its pid and that of a helper it starts in
# its process group (in the file named by $1) so the test can check both are gone.
echo $$ > "$1"
sleep 30 &
echo $! >> "$1"
wait
