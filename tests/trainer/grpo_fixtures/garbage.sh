#!/bin/sh
# Reward program that prints one non-number per sample.
while read -r line; do echo "reward: high"; done
