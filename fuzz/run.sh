#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 60) each, keeping its corpus in
# fuzz/corpus/<target>, and prints one line per target: executions, corpus entries, crashes.
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the run (turn it into a
# regression test, then delete it).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGETS:-batch_file gsm receipt mo_udh sftp_path config dispatch_log backup}"
export PATH="$PWD/.tools/bin:$PATH"
command -v cargo-fuzz >/dev/null || cargo install --locked --root .tools cargo-fuzz
failed=0
summary=""
for t in $targets; do
    mkdir -p "fuzz/corpus/$t"
    log="fuzz/target/$t.log"
    mkdir -p fuzz/target
    if cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=65536 >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see $log and fuzz/artifacts/$t)"
        failed=1
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' | tail -1 || true)
    corpus=$(ls "fuzz/corpus/$t" | wc -l)
    summary+=$(printf '%-14s %12s executions %8s corpus entries   %s' "$t" "${runs:-?}" "$corpus" "$result")$'\n'
done
printf '\nfuzz: %s s per target\n%s' "$seconds" "$summary"
exit $failed
