# Shell helpers the benchmark scripts source (pipeline_schedules.sh, parallel_layouts.sh): reading
# dsx's metrics.jsonl without a JSON tool.

# median of the numbers on stdin
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# a numeric field of every metrics.jsonl line after the first `skip` ones: field FILE KEY SKIP
field() { awk -v key="\"$2\":" -v skip="$3" 'NR > skip { i = index($0, key); if (i) { s = substr($0, i + length(key)); sub(/[,}].*/, "", s); print s } }' "$1"; }
