#!/bin/sh
# `make bench-compare OLD=/path/to/an/older/smsdrop`: the ingest and dispatch benchmarks with an
# older binary and this one in turns, in one invocation (this machine is noisy: compare the
# ratios each benchmark gives against its own yardstick, round by round).
#   ROUNDS (3), LINES (ingest, 1000000), MESSAGES (dispatch, 100000).
set -eu
old=${OLD:?set OLD to the older binary}
new=${NEW:-target/release/smsdrop}
rounds=${ROUNDS:-3}
echo "ingest: lines, MiB, ingest s, lines/s, peak MiB, bare csv s, ratio (ingest / bare read)"
echo "dispatch: round, bare rusmppc submit/s, smsdrop submit/s, ratio (smsdrop / bare client)"
i=1
while [ "$i" -le "$rounds" ]; do
    for which in old new; do
        if [ "$which" = old ]; then bin=$old; else bin=$new; fi
        printf '%s round %s\n' "$which" "$i"
        SMSDROP_BIN=$bin SMSDROP_BENCH_LINES=${LINES:-1000000} \
            cargo bench --locked --bench ingest 2>/dev/null | grep -E '^ +[0-9]' | sed 's/^/  ingest  /'
        SMSDROP_BIN=$bin SMSDROP_BENCH_ROUNDS=1 SMSDROP_BENCH_TPS_SECS=5 SMSDROP_BENCH_MESSAGES=${MESSAGES:-100000} \
            cargo bench --locked --bench dispatch 2>/dev/null | grep -E '^1 ' | sed 's/^1 /  dispatch/'
    done
    i=$((i + 1))
done
