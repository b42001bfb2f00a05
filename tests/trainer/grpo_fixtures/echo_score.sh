#!/bin/sh
# Correct reward program: prints each line's "score" field (given through the prompt's extra
# JSON), so a test can check that every sample arrived, in order, as one line.
exec awk -F'"score":' '{ split($2, a, /[,}]/); print a[1] }'
