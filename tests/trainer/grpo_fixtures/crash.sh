#!/bin/sh
# Reward program that fails: a message on stderr and exit status 1.
echo "reward model exploded" >&2
exit 1
